"""Shared test helpers for LAION-CLAP / the text encoder (random weights, no network)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import siren  # noqa: F401  (HF offline before transformers / laion_clap)
from siren.clap import Clap, ClapConfig, _clap_module


def random_clap(seed: int = 0) -> Clap:
    return Clap(ClapConfig(weights="random", seed=seed))


def write_tiny_roberta_vocab(dest: Path) -> tuple[Path, Path]:
    """A real (small) byte-level BPE in roberta-base's file format: the 256 byte symbols, roberta's
    specials at roberta's ids (<s>=0, <pad>=1, </s>=2, <unk>=3) and a few merges."""
    dest.mkdir(parents=True, exist_ok=True)
    byte_symbols = list(_clap_module().tokenizer.bytes_to_unicode().values())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for sym in byte_symbols:
        vocab[sym] = len(vocab)
    merges = [("Ġ", "d"), ("o", "g"), ("Ġd", "og"), ("a", "i"), ("ai", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<mask>"] = len(vocab)
    (dest / "vocab.json").write_text(json.dumps(vocab))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return dest / "vocab.json", dest / "merges.txt"


def sine(freq: float, seconds: float, sample_rate: int) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    return (0.5 * torch.sin(2 * torch.pi * freq * t)).float()
