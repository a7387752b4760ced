"""Audio loading and the paper's preprocessing (appendix A).

Load with soundfile, mix to mono (mean over channels), resample to 16 kHz with
torchaudio's windowed-sinc resampler, then cut to fixed-length items:

- ``pad`` (default): the first ``duration_s`` seconds, zero-padded to exactly ``duration_s``
  (appendix A: "shorter clips are zero-padded to 10 s"; AudioCaps clips are 10 s). The codec encodes the
  clip without the zeros (``unpadded``), as the authors' code; the pad frames' codes are 0 and masked.
- ``segment``: appendix A in full: clips longer than ``duration_s`` are split into
  non-overlapping ``duration_s`` chunks (stride = duration) and the residual (< duration)
  is dropped; shorter clips are zero-padded. One file can give several items.
- ``crop``: the first ``duration_s`` seconds; shorter clips keep their length (the loader
  pads them with a mask).
"""
from __future__ import annotations

import io
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from siren.codec import HOP, SAMPLE_RATE
from siren.errors import AudioError, DataError

log = logging.getLogger(__name__)

MIN_SAMPLE_RATE = 8_000
SILENCE_PEAK = 1e-4  # -80 dBFS: a peak below this is an (effectively) silent file
POLICIES = ("pad", "segment", "crop")
# torchaudio.functional.resample's defaults, spelled out: they are part of the cache key.
RESAMPLER = dict(name="torchaudio.functional.resample", resampling_method="sinc_interp_hann",
                 lowpass_filter_width=6, rolloff=0.99)


@dataclass
class AudioConfig:
    policy: str = "pad"  # pad | segment | crop (see module docstring)
    duration_s: float = 10.0  # the paper's 10 s items

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise DataError(f"audio.policy must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        if not (math.isfinite(self.duration_s) and self.duration_s >= HOP / SAMPLE_RATE):  # 0.00001 s: a traceback
            raise DataError(f"audio.duration_s must be at least one codec frame ({HOP / SAMPLE_RATE:g} s) and finite, "
                            f"got {self.duration_s}")

    @property
    def n_samples(self) -> int:
        return int(round(self.duration_s * SAMPLE_RATE))

    def key(self) -> dict:
        """Everything that changes the waveform handed to the codec (part of the codes cache key)."""
        return {**asdict(self), "sample_rate": SAMPLE_RATE, "mono": "mean", "resampler": RESAMPLER}


def to_mono(x: np.ndarray, where: str | Path) -> np.ndarray:
    """[N] or [N, C] -> [N], the mean over channels."""
    if x.ndim == 1:
        return x
    if x.ndim != 2 or x.shape[1] == 0:
        raise AudioError(f"{where}: audio has no channels (shape {tuple(x.shape)}); expected [samples, channels>=1]")
    return x.mean(axis=1)


def resample(x: torch.Tensor, sr: int) -> torch.Tensor:
    """[N] at ``sr`` -> [ceil(N * 16000 / sr)] at 16 kHz."""
    if sr == SAMPLE_RATE:
        return x
    import torchaudio.functional as AF  # pure-Python part of torchaudio (see ENVIRONMENT.md)

    p = {k: v for k, v in RESAMPLER.items() if k != "name"}
    return AF.resample(x, sr, SAMPLE_RATE, **p)


def read_sound(source, where: str | Path, warn: bool = True) -> tuple[np.ndarray, int]:
    """soundfile.read(source) as float32 [N, C] and its rate; logs a warning naming ``where`` if the file
    is cut short. soundfile's own exceptions pass through."""
    with sf.SoundFile(source) as f:
        x = f.read(dtype="float32", always_2d=True)
        # Container formats (WAV, AIFF, W64, RF64): libsndfile trims the declared size to the bytes present and
        # logs "<chunk> : N (should be M)"; others (MP3) keep the header's frame count and decode fewer frames.
        cut = [m for m in re.finditer(r"(\S+)\s*:\s*(\d+) \(should be (\d+)\)", f.extra_info) if int(m[2]) > int(m[3])]
        if warn and cut:
            log.warning("%s: truncated file (or a wrong size in its header): chunk '%s' declares %s bytes, the file "
                        "holds %s; using the %d frames present", where, cut[-1][1], cut[-1][2], cut[-1][3], len(x))
        elif warn and len(x) < f.frames:
            log.warning("%s: truncated file: decoded %d of the %d frames its header declares; using those",
                        where, len(x), f.frames)
        return x, f.samplerate


def load_audio(path: str | Path, data: bytes | None = None, warn: bool = True) -> torch.Tensor:
    """Mono float32 waveform [N] at 16 kHz; ``data`` = the file's bytes if already read.

    Raises AudioError naming the file for: missing, unreadable, empty, unsupported sample
    rate, NaN/inf samples, all-silent. Logs a warning (``warn``) for a truncated file and for
    one shorter than a codec frame.
    """
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise AudioError(f"{path}: audio file not found")
        data = path.read_bytes()
    try:
        x, sr = read_sound(io.BytesIO(data), path, warn)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        # libsndfile names the in-memory buffer by its address: the same file gave other bytes in the index each run
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(e)).strip() or "no detail"
        raise AudioError(f"{path}: unreadable audio ({type(e).__name__}: {detail})") from None
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(f"{path}: unsupported sample rate {sr} Hz (need >= {MIN_SAMPLE_RATE} Hz)")
    channels, x = x, to_mono(x, path)
    if x.size == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: {int((~np.isfinite(x)).sum())} NaN/inf sample(s)")
    peak = float(np.abs(x).max())
    if peak < SILENCE_PEAK:
        db = "-inf" if peak == 0 else f"{20 * math.log10(peak):.1f}"
        # channels in antiphase cancel in the mix: a file that plays loud. Averaging alone takes the mix down to
        # 1/C of the loudest channel (one channel, the others silent); "cancel" only far below that
        each = float(np.abs(channels).max())
        cancel = channels.ndim == 2 and each >= SILENCE_PEAK and peak * channels.shape[1] < 0.1 * each
        why = (f"; its {channels.shape[1]} channels cancel in the mono mix (their own peak {20 * math.log10(each):.1f}"
               f" dBFS): one channel is inverted, fix its polarity") if cancel else ""
        raise AudioError(f"{path}: all-silent audio (peak {db} dBFS < {20 * math.log10(SILENCE_PEAK):.0f} dBFS){why}")
    wav = resample(torch.from_numpy(np.ascontiguousarray(x)), sr)
    if warn and wav.shape[-1] < HOP:
        log.warning("%s: %d sample(s) at %d Hz, shorter than one codec frame (%d samples, %g ms): nearly no "
                    "audio; check the file", path, wav.shape[-1], SAMPLE_RATE, HOP, 1000 * HOP / SAMPLE_RATE)
    return wav


def silent_segments(wav: torch.Tensor, index: list[int], cfg: AudioConfig) -> list[int]:
    """The chunks of ``wav`` that ``standardize`` left out as silent, given the chunk index it returned; [] for an
    item it did not split."""
    if index[0] < 0:
        return []
    kept = set(index)
    return [k for k in range(wav.shape[-1] // cfg.n_samples) if k not in kept]


def standardize(wav: torch.Tensor, cfg: AudioConfig, where: str | Path = "audio", warn: bool = True
                ) -> tuple[torch.Tensor, list[int], list[int]]:
    """[N] 16 kHz -> (items [S, n], real (unpadded) samples per item, chunk index per item) under
    ``cfg.policy``; the chunk index is the item's position in time (k * duration_s), -1 if the file was not split.

    ``segment`` drops silent chunks, with a warning (``warn``: callers reading a file again pass False); with
    ``pad``/``crop`` a silent first ``duration_s`` is an error.
    """
    d = cfg.n_samples
    if cfg.policy == "segment" and wav.shape[-1] > d:
        chunks = wav[: wav.shape[-1] // d * d].reshape(-1, d)  # residual (< d samples) dropped
        keep = (chunks.abs().amax(-1) >= SILENCE_PEAK).nonzero()[:, 0].tolist()
        if not keep:
            raise AudioError(f"{where}: every {cfg.duration_s:g} s segment is silent")
        if warn and len(keep) < len(chunks):
            log.warning("%s: %d silent %g s segment(s) left out: %s", where, len(chunks) - len(keep), cfg.duration_s,
                        ", ".join(f"#{k}" for k in silent_segments(wav, keep, cfg)))
        return chunks[keep], [d] * len(keep), keep
    if wav[:d].abs().max() < SILENCE_PEAK:
        raise AudioError(f"{where}: the first {cfg.duration_s:g} s are silent (policy '{cfg.policy}' keeps only those)")
    n = min(wav.shape[-1], d)
    if cfg.policy == "crop":
        return wav[None, :d], [n], [-1]
    return torch.nn.functional.pad(wav[:d], (0, d - n))[None], [n], [-1]


def unpadded(item: torch.Tensor, real: int) -> torch.Tensor:
    """What the codec encodes of one standardised item: its real samples (rounded up to a hop), not
    ``policy=pad``'s zeros. DAC's encoder is not causal, so zeros after a short clip changed the codes of its last
    ~0.1 s; the authors' code encodes each clip at its own length. Callers pad the frames back (masked)."""
    return item[..., : math.ceil(real / HOP) * HOP]


def n_frames(n_samples: int) -> int:
    return math.ceil(n_samples / HOP)
