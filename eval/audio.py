"""Reading the clips an evaluation compares: one loader for generated and reference audio.

Every clip is read with soundfile at its own sample rate, mixed to mono (mean of channels) and
cropped to its first ``max_seconds``; each backbone then resamples to the rate it needs. A clip's
identity for the embedding cache is the hash of exactly these samples and their rate. Bad files
are collected and reported together, naming every one, before anything is computed.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from siren.codec import HOP, SAMPLE_RATE

log = logging.getLogger(__name__)

MONO = "mean of channels"
MIN_SECONDS = HOP / SAMPLE_RATE  # one codec frame (20 ms): shorter clips are warned about
CROP = "first max_seconds of each clip (none when max_seconds <= 0); no padding at load (see each backbone)"


@dataclass(frozen=True)
class Clip:
    id: str
    wav: np.ndarray  # [N] float32, mono, at ``sr``
    sr: int
    content_hash: str  # sha256 of (sr, samples): the cache key's audio part
    path: str = ""


class BadAudioError(ValueError):
    """One or more audio files cannot be evaluated; the message names each and why."""


def content_hash(wav: np.ndarray, sr: int) -> str:
    h = hashlib.sha256(f"sr={int(sr)};float32;".encode())
    h.update(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
    return h.hexdigest()


def make_clip(id: str, wav: np.ndarray, sr: int, max_seconds: float = 10.0, path: str = "") -> Clip:
    """A clip from samples [N] or [N, C] (channels last, as soundfile returns); raises ValueError if unusable."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if wav.ndim != 1:
        raise ValueError(f"expected samples [N] or [N, channels], got shape {wav.shape}")
    if max_seconds and max_seconds > 0:
        wav = wav[: int(round(max_seconds * sr))]
    if wav.size == 0:
        raise ValueError("no samples (empty audio)")
    if not np.isfinite(wav).all():
        raise ValueError(f"{int((~np.isfinite(wav)).sum())} NaN/inf samples")
    wav = np.ascontiguousarray(wav)
    return Clip(id=id, wav=wav, sr=int(sr), content_hash=content_hash(wav, sr), path=path)


def _read(id: str, path: Path, max_seconds: float) -> Clip:
    from siren.data.audio import read_sound

    clip = make_clip(id, *read_sound(str(path), path), max_seconds, str(path))  # warns if truncated
    if clip.wav.size < MIN_SECONDS * clip.sr:
        log.warning("%s (id %s): %d sample(s) at %d Hz, shorter than %g ms (one codec frame); scored as it is",
                    path, id, clip.wav.size, clip.sr, 1000 * MIN_SECONDS)
    return clip


def load_clips(paths: dict[str, Path], max_seconds: float = 10.0, what: str = "audio",
               workers: int = 4) -> list[Clip]:
    """Read every ``id -> path`` (in the dict's order); all failures are raised together in one BadAudioError."""
    def read(item):
        id, path = item
        try:
            return _read(id, Path(path), max_seconds)
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
