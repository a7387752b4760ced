"""Reading the clips an evaluation compares: one loader for generated and reference audio.

Every clip is read with soundfile at its own sample rate, keeping all its channels, and cropped
as ``crop`` says: ``whole`` (audioldm_eval, frechet_audio_distance and laion_clap read whole
files) or ``10s`` (the first 10 s). Each backbone then makes it mono (``channel``: ``mono``) and
resamples it to the rate it needs (``resampler``: ``resample``, as each metric's reference code
does). A clip's identity for the embedding cache is the hash of exactly these samples and their
rate. Bad files are collected and reported together, naming every one, before anything is
computed. A file's samples are not kept: each network's pass reads the file again (``Clip.wav``,
checked against that hash).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from siren.codec import HOP, SAMPLE_RATE
from siren.errors import AudioError, ConfigError

log = logging.getLogger(__name__)

CROPS = {"whole": None, "10s": 10.0}  # crop name -> seconds kept from the start (None: the whole file)
CHANNELS = ("first", "mean")  # audioldm_eval's WaveDataset keeps channel 0; its FAD and laion_clap average


def crop_seconds(crop: str) -> float | None:
    if crop not in CROPS:
        raise ConfigError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return CROPS[crop]


def mono(wav: np.ndarray, channel: str) -> np.ndarray:
    """[N, C] -> [N] float32: channel 0 (``first``) or the mean of the channels in float64 (``mean``)."""
    if channel == "first":
        return np.ascontiguousarray(wav[:, 0])
    if channel == "mean":
        return wav.astype(np.float64).mean(axis=1).astype(np.float32)
    raise ConfigError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")


# How each resampler is called (and so what it computes): recorded on the card, hashed into cache keys.
RESAMPLERS = {
    "torchaudio": "torchaudio.functional.resample(float32, sinc_interp_hann, lowpass_filter_width=6, rolloff=0.99)"
                  " (audioldm_eval WaveDataset)",
    "resampy": "resampy.resample(float64, filter='kaiser_best') (audioldm_eval / frechet_audio_distance FAD)",
    "librosa": "librosa.resample(float32, res_type='soxr_hq') (librosa.load(sr=48000) in laion_clap)",
}

# The distributions whose code computes each resampler's output (their versions key the embedding cache)
RESAMPLER_LIBRARIES = {"torchaudio": ("torchaudio",), "resampy": ("resampy",), "librosa": ("librosa", "soxr")}


def resample(wav: np.ndarray, sr: int, target: int, method: str = "torchaudio") -> np.ndarray:
    """Mono float32 samples [N] from ``sr`` to ``target`` with one of ``RESAMPLERS``; float32 out."""
    if method not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {', '.join(RESAMPLERS)}, got {method!r}")
    if sr == target:
        return wav
    if method == "torchaudio":
        import torch
        import torchaudio.functional as AF

        return AF.resample(torch.from_numpy(wav), sr, target, lowpass_filter_width=6, rolloff=0.99,
                           resampling_method="sinc_interp_hann").numpy()
    if method == "resampy":
        import resampy

        if int(wav.shape[0] * float(target) / float(sr)) < 1:  # its own output length: no sample; it raises there
            return np.zeros(0, np.float32)

        return resampy.resample(wav.astype(np.float64), sr, target, filter="kaiser_best").astype(np.float32)
    import librosa

    return librosa.resample(wav, orig_sr=sr, target_sr=target, res_type="soxr_hq").astype(np.float32)


MIN_SECONDS = HOP / SAMPLE_RATE  # one codec frame (20 ms): shorter clips are warned about


@dataclass(frozen=True)
class Clip:
    id: str
    sr: int
    content_hash: str  # sha256 of (sr, samples): the cache key's audio part
    path: str = ""
    crop: str = "whole"
    samples: np.ndarray | None = field(default=None, repr=False)  # [N, C] float32: held by a clip made from samples

    @property
    def wav(self) -> np.ndarray:
        """[N, C] float32 at ``sr``, every channel: the clip's own samples, or its file read again. A clip read from
        a file holds none of its samples between uses: an evaluation held every clip's, about 20 GB at 4.9k 10 s
        44.1 kHz stereo clips."""
        if self.samples is not None:
            return self.samples
        from siren.data.audio import read_sound

        try:
            now = make_clip(self.id, *read_sound(self.path, self.path, warn=False), self.crop)
        except Exception as e:  # noqa: BLE001 - it was read and checked when the evaluation began
            raise BadAudioError(f"{self.path} (id {self.id}) cannot be read again ({type(e).__name__}: {e}); it was "
                                f"read when the evaluation began: run it again once nothing writes there") from None
        if now.content_hash != self.content_hash:
            raise BadAudioError(f"{self.path} (id {self.id}) changed while it was evaluated: run the evaluation "
                                f"again once nothing writes there (with the embedding cache on, what it computed is "
                                f"kept)")
        return now.samples


class BadAudioError(AudioError):
    """One or more audio files cannot be evaluated; the message names each and why."""


def content_hash(wav: np.ndarray, sr: int) -> str:
    # the channel count of a multi-channel clip too: its interleaved bytes are those of a mono clip twice as long
    channels = f"channels={wav.shape[1]};" if wav.ndim > 1 and wav.shape[1] > 1 else ""  # mono keys as before
    h = hashlib.sha256(f"sr={int(sr)};{channels}float32;".encode())
    h.update(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
    return h.hexdigest()


def make_clip(id: str, wav: np.ndarray, sr: int, crop: str = "whole", path: str = "") -> Clip:
    """A clip from samples [N] or [N, C] (channels last, as soundfile returns); raises ValueError if unusable."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        wav = wav[:, None]
    if wav.ndim != 2 or wav.shape[1] == 0:
        raise ValueError(f"expected samples [N] or [N, channels], got shape {wav.shape}")
    seconds = crop_seconds(crop)
    if seconds is not None:
        wav = wav[: int(round(seconds * sr))]
    if wav.size == 0:
        raise ValueError("no samples (empty audio)")
    if not np.isfinite(wav).all():
        raise ValueError(f"{int((~np.isfinite(wav)).sum())} NaN/inf samples")
    wav = np.ascontiguousarray(wav)
    return Clip(id=id, sr=int(sr), content_hash=content_hash(wav, sr), path=path, crop=crop, samples=wav)


def _read(id: str, path: Path, crop: str) -> Clip:
    from siren.data.audio import read_sound

    clip = make_clip(id, *read_sound(str(path), path), crop, str(path))  # warns if truncated
    if clip.wav.shape[0] < MIN_SECONDS * clip.sr:
        log.warning("%s (id %s): %d sample(s) at %d Hz, shorter than %g ms (one codec frame); scored as it is",
                    path, id, clip.wav.shape[0], clip.sr, 1000 * MIN_SECONDS)
    return replace(clip, samples=None)  # read again where used (Clip.wav)


def load_clips(paths: dict[str, Path], crop: str = "whole", what: str = "audio", workers: int = 4) -> list[Clip]:
    """Read every ``id -> path`` (in the dict's order); all failures are raised together in one BadAudioError."""
    def read(item):
        id, path = item
        try:
            return _read(id, Path(path), crop)
        except Exception as e:  # noqa: BLE001 - soundfile raises several types; all mean "unusable"
            return f"{path} (id {id}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(read, paths.items()), total=len(paths), desc=f"read {what}", unit="clip",
                            leave=False))
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise BadAudioError(f"{len(bad)} of {len(paths)} {what} files cannot be evaluated; fix or regenerate them:\n  "
                            + "\n  ".join(bad))
    return results
