"""Small synthetic audio sets for the eval tests: sine + noise clips and a reference manifest."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf


def synth(seed: int, seconds: float = 2.5, sr: int = 16000) -> np.ndarray:
    """A clip with a seeded tone, its harmonic and some noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = rng.uniform(150, 2000)
    wav = (0.4 * np.sin(2 * np.pi * f * t) + 0.15 * np.sin(2 * np.pi * 2.5 * f * t + 1.0)
           + 0.05 * rng.standard_normal(t.size))
    return (wav * rng.uniform(0.3, 1.0)).astype(np.float32)


def write_set(folder: Path, ids: list[str], seed: int, seconds: float = 2.5, sr: int = 16000) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, i in enumerate(ids):
        out[i] = folder / f"{i}.wav"
        sf.write(out[i], synth(seed * 1000 + k, seconds, sr), sr)
    return out


def write_manifest(path: Path, ids: list[str], audio_dir: str = "audio", captions_per_id: int = 1) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "audio", "caption", "label"])
        for i in ids:
            for c in range(captions_per_id):
                w.writerow([i, f"{audio_dir}/{i}.wav", f"caption {c} of clip {i}: a tone and some noise", "x"])
    return path


def make_reference(root: Path, n: int = 4, seconds: float = 2.5, sr: int = 16000, captions_per_id: int = 1):
    """(manifest path, ids): reference clips under root/audio and a manifest root/test.csv."""
    ids = [f"clip{k:02d}" for k in range(n)]
    write_set(root / "audio", ids, seed=1, seconds=seconds, sr=sr)
    return write_manifest(root / "test.csv", ids, captions_per_id=captions_per_id), ids
