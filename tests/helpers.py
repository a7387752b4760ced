"""Helpers the test modules share: stand-in codec tables and a tiny model config. The fixtures_*
modules build on these; the real collate function (siren.data.dataset.collate) batches everywhere."""
from __future__ import annotations

import time

import pytest
import torch

from siren.codec import CODEBOOK_DIM, CODEBOOK_SIZE, N_LAYERS, CodeTables
from siren.model.config import ModelConfig


def code_tables(seed: int = 0, proj_scale: float = 0.1) -> CodeTables:
    """Random stand-in codec tables (codebooks, out-projection, a non-zero out-projection bias)."""
    g = torch.Generator().manual_seed(seed)
    return CodeTables(torch.randn(N_LAYERS, CODEBOOK_SIZE, CODEBOOK_DIM, generator=g),
                      proj_scale * torch.randn(N_LAYERS, 1024, CODEBOOK_DIM, generator=g),
                      0.1 * torch.randn(N_LAYERS, 1024, generator=g))


def tiny_model_config(distribution: str = "6-2", codec: str = "test-random-tables") -> ModelConfig:
    """A CPU-millisecond model: d=32, one backbone and one decoder block."""
    return ModelConfig(distribution=distribution, dim=32, main_layers=1, decoder_layers=1, attn_heads=2, codec=codec)


def wait_for(condition, what: str, deadline_s: float = 60) -> None:
    """Polls until condition() holds; the deadline only stops a hung test, it measures nothing."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)
