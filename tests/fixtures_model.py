"""Shared helpers for the model and sampler tests: tiny configs, random batches, code tables."""
from __future__ import annotations

import functools

import torch

from siren.codec import CodeTables
from siren.config import load_config
from siren.model import CollaborativeModel, ModelConfig, presets
from tests.helpers import code_tables


@functools.lru_cache(maxsize=1)
def codec():
    """The real DAC 16 kHz codec with random weights (asked for explicitly), built once."""
    from siren.codec import Codec, CodecConfig
    return Codec(CodecConfig(weights="random", seed=0))


@functools.lru_cache(maxsize=1)
def demo_codec():
    """The committed demo codec: the same DAC class and quantizer as the paper's (1024-d latent, 12 x 1024
    codes, hop 320) with narrow convolutions, so 8x (encode) to 36x (decode) faster than the random paper-size
    one above. For the tests that only need a real codec to pass audio through; the paper-size one stays where
    its own shapes or weights are what is tested."""
    from siren.codec import Codec, CodecConfig
    return Codec(CodecConfig(weights="demo"))


def synthetic_tables(seed: int = 0) -> CodeTables:
    """Random stand-in tables with a non-zero out-projection bias (the random DAC's is zero)."""
    return code_tables(seed, proj_scale=0.2)


def tiny(*overrides: str) -> ModelConfig:
    return load_config(ModelConfig, ["scale=tiny", "codec=synthetic-test-tables", *overrides], presets())


def tiny_model(*overrides: str, seed: int = 0) -> CollaborativeModel:
    torch.manual_seed(seed)
    return CollaborativeModel(tiny(*overrides), synthetic_tables()).eval()


def text_batch(B: int = 2, L: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1:, L - 2:] = False  # padded text in every row but the first
    return torch.randn(B, L, 768, generator=g), mask


def code_batch(B: int = 2, T: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (B, 12, T), generator=torch.Generator().manual_seed(seed))
