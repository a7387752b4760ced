"""Tiny stage-1 runs for the stage-2 tests: randomly initialised experts saved with the
stage-1 checkpoint code (siren.checkpoint), so siren.rl reads them like trained ones."""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from siren import checkpoint as ckpt
from siren.codec import CodeTables
from siren.config import to_dict
from siren.model import CollaborativeModel
from siren.run_dir import write_run_config
from tests.helpers import code_tables, tiny_model_config  # noqa: F401 (re-exported to the RL tests)

TEXT_DIM = 768


random_tables = code_tables  # the trainer tests' name for them


def make_stage1_run(run_dir: Path, distribution: str = "6-2", seed: int = 0, tables: CodeTables | None = None,
                    codec_id: str = "test-random-tables", text_id: str = "test-hashed-text",
                    step: int = 10, frontends: dict | None = None, codec_weights: str = "random") -> Path:
    """A finished stage-1 run of randomly initialised experts, in the format siren.train writes.
    ``frontends``: {"codec": CodecConfig dict, "text": TextConfig dict}, recorded so eval can rebuild them."""
    cfg = tiny_model_config(distribution, codec_id)
    torch.manual_seed(seed)
    model = CollaborativeModel(cfg, tables if tables is not None else random_tables(seed))
    shared = {"model": to_dict(cfg), "codec": {"id": codec_id, "weights": codec_weights},
              "text": {"id": text_id, "weights": "random"}}
    for what, conf in (frontends or {}).items():
        shared[what]["config"] = conf
    write_run_config(run_dir, shared)
    for k, e in enumerate(model.experts):
        ckpt.save(ckpt.expert_dir(run_dir, k), step, e.state_dict(), {},
                  {**shared, "expert": k, "train": {"steps": step}, "finished": True}, keep_last=1)
    return run_dir


class HashedText:
    """Fixed random text states per caption (seeded by its CRC): a stand-in for the frozen
    text encoder in tests of the RL loop, which only needs distinct conditions per prompt."""

    def __init__(self, length: int = 4):
        self.length = length

    def __call__(self, captions: list[str]):
        from types import SimpleNamespace

        states = torch.stack([torch.randn(self.length, TEXT_DIM, generator=torch.Generator().manual_seed(
            zlib.crc32(c.encode()))) for c in captions])
        mask = torch.ones(len(captions), self.length, dtype=torch.bool)
        return SimpleNamespace(states=states, mask=mask, pooled=None)


PROMPTS = ["a dog barks", "rain on a roof", "a car passes by", "birds sing", "a door slams", "people talk"]
