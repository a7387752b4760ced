"""Synthetic stage-1 data in the COMMON.md batch format, for the trainer and checkpoint tests.

Random codes and random text states: the trainer only needs batches of the agreed shape; the
real prepared data (siren.data) is integrated separately. Clips may have different lengths so
``frame_mask`` padding is exercised.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from siren.codec import CODEBOOK_SIZE, N_LAYERS
from siren.data.dataset import collate
from siren.train import Stage1Data, parse
from tests.helpers import code_tables, overridden

TEXT_DIM = 768


class SyntheticClips(Dataset):
    """``n`` clips: codes [12, T_i] and text states [L_i, 768], fixed by ``seed``."""

    def __init__(self, n: int, frames: int, text_len: int = 6, seed: int = 0, ragged: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            T = frames - (int(torch.randint(0, frames // 3 + 1, (), generator=g)) if ragged else 0)
            L = text_len - (int(torch.randint(0, text_len // 2 + 1, (), generator=g)) if ragged else 0)
            self.items.append({"codes": torch.randint(0, CODEBOOK_SIZE, (N_LAYERS, T), generator=g),
                               "text": torch.randn(L, TEXT_DIM, generator=g),
                               "text_mask": torch.ones(L, dtype=torch.bool),
                               "id": f"clip{i}",
                               "caption": f"synthetic clip {i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key  # (epoch, index) keys as siren.data's datasets take; no random crop here
        return self.items[i]


random_tables = code_tables


def synthetic_data(n_train: int = 6, n_val: int = 3, frames: int = 12, seed: int = 0, ragged: bool = True,
                   val: bool = True) -> Stage1Data:
    train = SyntheticClips(n_train, frames, seed=seed, ragged=ragged)
    test = SyntheticClips(n_val, frames, seed=seed + 1, ragged=ragged) if val else None
    return Stage1Data(train, test, collate, random_tables(seed), codec={"id": "test-tables", "weights": "random"},
                      text={"id": "test-text", "weights": "random"})


def tiny_args(run_dir, *extra: str) -> list[str]:
    """A CPU-second-sized stage-1 config (the discrete model's keys left out for ``family=continuous``, whose
    model keys ``extra`` gives)."""
    model = [] if "family=continuous" in extra else ["scale=tiny", "model.dim=32", "model.attn_heads=2",
                                                     "model.main_layers=1"]
    return overridden([f"run_dir={run_dir}", *model, "train.batch_size=2", "train.steps=8", "train.warmup_steps=2",
                       "train.lr=3e-3", "train.min_lr=3e-4", "train.log_every=1", "train.val_every=0",
                       "train.ckpt_every=4", "train.num_workers=0", "train.device=cpu", "train.precision=fp32",
                       "train.crop_s=0"], extra)


def tiny_config(run_dir, *extra: str):
    return parse(tiny_args(run_dir, *extra))



def count_steps(monkeypatch) -> list[int]:
    """Spy on ``siren.train.train_step``: one entry per optimiser step run from now on. Training is deterministic
    from its seed, so a restart that ignored its checkpoint and trained from step 0 would log the same losses and
    end at the same weights as a resumed one: a resume test counts the steps the restart ran too."""
    import siren.train as T

    ran, real = [], T.train_step

    def spy(*args, **kwargs):
        ran.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", spy)
    return ran
