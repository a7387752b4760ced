"""Shared test helpers for siren.data: tiny manifests of real clips, and models that count their calls."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from siren.data import demo


def write_wav(path: Path, x: np.ndarray, sr: int = 16_000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, subtype=subtype)
    return path


def write_manifest(path: Path, rows: list[dict], columns=("id", "audio", "caption", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def tiny_set(root: Path, n: int = 4, seconds: float = 0.4) -> Path:
    """n short demo clips (different classes) as wavs + manifest.csv; clip 1 is stored at 22.05 kHz stereo."""
    rows = []
    for i in range(n):
        x, caption = demo.clip(i, "train", 0)
        x = x[: int(seconds * demo.SR)]
        if i == 1:  # a stereo 22.05 kHz file: mono mixing and resampling in the same pipeline
            t = np.arange(int(seconds * 22_050)) / 22_050
            x = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], 1)
            write_wav(root / f"a{i}.wav", x, 22_050)
        else:
            write_wav(root / f"a{i}.wav", x)
        rows.append({"id": f"c{i}", "audio": f"a{i}.wav", "caption": caption, "label": demo.CLASSES[i].name})
    return write_manifest(root / "manifest.csv", rows)


class Counting:
    """Wraps a codec or text encoder: counts what goes through ``encode`` (``sizes``: items per call);
    ``fail_after`` items -> raise (a job killed mid-run)."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.items, self.calls, self.sizes = inner, fail_after, 0, 0, []

    def __getattr__(self, name):  # everything but encode: the wrapped model's
        return getattr(self.inner, name)

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def weights_label(self) -> str:
        return self.inner.weights_label

    def encode(self, x):
        n = len(x)
        if self.fail_after is not None and self.items + n > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.items += n
        self.calls += 1
        self.sizes.append(n)
        return self.inner.encode(x)
