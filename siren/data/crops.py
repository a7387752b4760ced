"""Appendix B's crop filter: stage-1 crops of ``crop_s`` seconds are kept only when their CLAP similarity
to the caption is above a threshold (paper: 6 s crops of the 10 s clips, similarity > 0.20).

``prepare crop_s=6`` scores, per item, the crops starting on a fixed grid of offsets (every
``crop_step_s`` = 0.5 s, the last one flush with the end): the CLAP cosine of the crop's waveform (16 kHz,
the item as prepare cut it, padding included, through ``Clap.embed_audio`` as eval embeds clips) to
the caption's CLAP text embedding, and the crop's loudness (siren/data/activity.py ``energy_db``). The
table is cached (cache.py ``crops_key``) and copied into the split's index.

The stage-1 dataset then draws a crop uniformly among the grid offsets that pass ``crop_min_clap``
(``allowed``); with none passing it takes the best one and counts a fallback. Besides the CLAP
threshold an offset must not be silent: at most ``SILENT_DB`` below the item's loudest crop. CLAP
scores silence unpredictably (with random or weak weights, or on a zero-padded tail), and a silent
crop teaches the model nothing about its caption, so loudness is checked independently of CLAP.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from siren.codec import FRAME_RATE, HOP
from siren.data.activity import energy_db

SILENT_DB = 40.0  # a crop this many dB below the item's loudest crop counts as silent


def grid(frames: int, crop: int, step: int) -> list[int]:
    """Crop offsets (frames): 0, step, 2 step, ... and the last full crop; [0] when the item is not longer."""
    if frames <= crop:
        return [0]
    offsets = list(range(0, frames - crop + 1, step))
    return offsets if offsets[-1] == frames - crop else offsets + [frames - crop]


def frames_of(seconds: float) -> int:
    return max(1, round(seconds * FRAME_RATE))


@torch.no_grad()
def score_crops(clap, items: torch.Tensor, caption: str, crop: int, step: int) -> dict[str, torch.Tensor]:
    """items [S, N] at 16 kHz (one file's items, as prepare cut them) -> {"offsets" [O], "clap" [S, O],
    "energy_db" [S, O]} for the crops of ``crop`` frames on the grid of ``step`` frames."""
    frames = math.ceil(items.shape[-1] / HOP)
    offsets = grid(frames, crop, step)
    crops = [x[o * HOP:(o + crop) * HOP] for x in items for o in offsets]
    text = clap.embed_text([caption]).float().cpu()[0]
    audio = clap.embed_audio(crops).float().cpu()
    shape = (items.shape[0], len(offsets))
    return {"offsets": torch.tensor(offsets, dtype=torch.int32), "clap": (audio @ text).reshape(shape),
            "energy_db": torch.tensor([energy_db(c) for c in crops], dtype=torch.float32).reshape(shape)}


def allowed(clap: np.ndarray, loudness_db: np.ndarray, min_clap: float) -> np.ndarray:
    """Which offsets may be drawn: CLAP similarity above ``min_clap`` and not silent."""
    return (clap > min_clap) & (loudness_db >= loudness_db.max() - SILENT_DB)


def fallback(clap: np.ndarray, loudness_db: np.ndarray) -> int:
    """Index of the best offset when none is allowed: highest CLAP similarity among the non-silent ones."""
    loud = loudness_db >= loudness_db.max() - SILENT_DB
    return int(np.argmax(np.where(loud, clap, -np.inf)))
