"""The RVQ tokenizer: DAC 16 kHz, r = 12 layers of 1024 codes, 8-d codebooks, hop 320 (50 frames/s).

Paper Eq. 1: f^0 = f, q^j = Q^j(f^{j-1}), f-hat^j = lookup(Z^j, q^j), x-hat = D(sum_j f-hat^j).
``layer_features`` gives f-hat^j both as the 8-d codebook vector and after DAC's own
out-projection (the 1024-d vector that is summed before decoding): the probes of section 3
and the code embeddings of the model (appendix B) start from these.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from siren import assets
from siren.io import sha256_file

SAMPLE_RATE = 16_000
N_LAYERS = 12
CODEBOOK_SIZE = 1024
CODEBOOK_DIM = 8
HOP = 320
FRAME_RATE = SAMPLE_RATE // HOP  # 50 frames/s

# The published 16 kHz DAC (weights_16khz.pth, tag 0.0.5) was trained with these kwargs.
DAC_KWARGS = dict(encoder_dim=64, encoder_rates=[2, 4, 5, 8], decoder_dim=1536, decoder_rates=[8, 5, 4, 2],
                  n_codebooks=N_LAYERS, codebook_size=CODEBOOK_SIZE, codebook_dim=CODEBOOK_DIM,
                  sample_rate=SAMPLE_RATE)


@dataclass
class CodecConfig:
    weights: str = "pretrained"  # "pretrained" (assets cache), "random" (explicit smoke-test mode) or a .pth path
    seed: int = 0  # random-init seed for weights=random


@dataclass
class CodeTables:
    """Frozen per-layer lookup tables the model's code embeddings are built from."""
    codebooks: torch.Tensor  # [12, 1024, 8]   Z^j
    out_weight: torch.Tensor  # [12, D_lat, 8]  DAC out-projection of layer j (weight norm folded in)
    out_bias: torch.Tensor  # [12, D_lat]


class Codec(nn.Module):
    def __init__(self, cfg: CodecConfig = CodecConfig()):
        super().__init__()
        import dac  # heavy import (audiotools): only when a codec is built

        self.cfg = cfg
        if cfg.weights == "random":
            torch.manual_seed(cfg.seed)
            self.dac = dac.DAC(**DAC_KWARGS)
            self.weights_label, self.weights_sha256 = "random", f"random-seed{cfg.seed}"
        else:
            path = assets.require("dac_16khz") if cfg.weights == "pretrained" else Path(cfg.weights)
            if not path.is_file():
                raise assets.MissingWeightsError(f"codec weights file {path} does not exist")
            self.dac = dac.DAC(**DAC_KWARGS)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            kwargs = ckpt.get("metadata", {}).get("kwargs", {})
            bad = {k: (kwargs[k], v) for k, v in DAC_KWARGS.items() if k in kwargs and kwargs[k] != v}
            if bad:
                raise ValueError(f"{path} is not the 16 kHz 12-layer DAC: (file, expected) differ for {bad}")
            self.dac.load_state_dict(ckpt["state_dict"])
            self.weights_label, self.weights_sha256 = "pretrained", sha256_file(path)
        self.dac.eval().requires_grad_(False)

    @property
    def id(self) -> str:
        """Identity for cache keys: a changed weight file changes it."""
        return f"dac16k-{self.weights_sha256[:16]}"

    @property
    def device(self) -> torch.device:
        return next(self.dac.parameters()).device

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [N] or [B, N] or [B, 1, N] at 16 kHz -> codes [B, 12, T] (int64), T = ceil(N / 320)."""
        x = wav.reshape(-1, 1, wav.shape[-1]).to(self.device, torch.float32)
        x = self.dac.preprocess(x, SAMPLE_RATE)  # right-pads to a multiple of the hop
        _, codes, *_ = self.dac.encode(x)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 12, T] -> wav [B, T * 320] at 16 kHz."""
        z, _, _ = self.dac.quantizer.from_codes(codes.to(self.device, torch.long))
        wav = self.dac.decode(z)[:, 0]
        n = codes.shape[-1] * HOP  # DAC's transposed convs come out a few samples short
        return torch.nn.functional.pad(wav, (0, max(0, n - wav.shape[-1])))[:, :n]

    @torch.no_grad()
    def layer_features(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, 12, T] -> (codebook vectors [B, 12, T, 8], out-projected f-hat^j [B, 12, T, D_lat])."""
        t = self.code_tables()
        idx = codes.to(self.device, torch.long)
        vec = torch.stack([t.codebooks[j][idx[:, j]] for j in range(N_LAYERS)], 1)
        return vec, torch.einsum("bjtc,jdc->bjtd", vec, t.out_weight) + t.out_bias[None, :, None]

    @torch.no_grad()
    def code_tables(self) -> CodeTables:
        qs = self.dac.quantizer.quantizers
        # out_proj is a weight-normed 1x1 conv; evaluating it on the identity folds the norm in.
        eye = torch.eye(CODEBOOK_DIM, device=self.device)[:, :, None]  # [8, 8, 1]: 8 one-hot inputs
        cols = [q.out_proj(eye)[:, :, 0] - q.out_proj(torch.zeros_like(eye))[:, :, 0] for q in qs]  # [8, D]
        bias = torch.stack([q.out_proj(torch.zeros_like(eye[:1]))[0, :, 0] for q in qs])
        return CodeTables(codebooks=torch.stack([q.codebook.weight for q in qs]).detach().clone(),
                          out_weight=torch.stack([c.T for c in cols]).contiguous(), out_bias=bias)
