"""The RVQ tokenizer: DAC 16 kHz, r = 12 layers of 1024 codes, 8-d codebooks, hop 320 (50 frames/s).

Paper Eq. 1: f^0 = f, q^j = Q^j(f^{j-1}), f-hat^j = lookup(Z^j, q^j), x-hat = D(sum_j f-hat^j).
``layer_features`` gives f-hat^j both as the 8-d codebook vector and after DAC's own
out-projection (the 1024-d vector that is summed before decoding): the probes of section 3
and the code embeddings of the model (appendix B) start from these.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from siren import assets, demo_weights
from siren.errors import CheckpointError, ConfigError, WeightsMismatchError
from siren.io import load_hashed, load_torch_file, sha256_file_once, weights_tag

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
# What every codec file must share with the paper's tokenizer (the model's code embeddings
# also need the 1024-d latent, siren/model/embedding.py); the widths of the convolutions may differ.
PAPER_KWARGS = dict(n_codebooks=N_LAYERS, codebook_size=CODEBOOK_SIZE, codebook_dim=CODEBOOK_DIM,
                    sample_rate=SAMPLE_RATE, latent_dim=1024)
WEIGHTS = ("pretrained", "random", "demo")
# weights=demo: a DAC the project trains on the embedded demo set (python -m siren.demo_assets.codec).
DEMO_FILE = demo_weights.FILES / demo_weights.CODEC_FILE
DEMO_LABEL = demo_weights.LABEL


@dataclass
class CodecConfig:
    # "pretrained" (assets cache), "random" (explicit smoke-test mode), "demo" (DEMO_FILE) or a .pth path
    weights: str = "pretrained"
    seed: int = 0  # random-init seed for weights=random

    def __post_init__(self):
        if not self.weights:
            raise ConfigError(f"codec.weights is empty; give one of {', '.join(WEIGHTS)} or a .pth path")


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
            def make():
                # without autograd, the weight-normed convolutions' ``weight`` is a plain tensor (recomputed from
                # g and v at each forward) that a kept network's copy can deepcopy; the codec never trains
                with torch.no_grad():
                    return dac.DAC(**DAC_KWARGS)

            # seeded without touching the caller's RNG; built once and copied after keep_loaded()
            self.dac = demo_weights.seeded(cfg.seed, make, key=("dac16k",))
            self.weights_label, self.weights_sha256 = "random", f"random-seed{cfg.seed}"
        else:
            path = weights_file(cfg.weights)
            if cfg.weights == "pretrained":
                assets.require("dac_16khz")  # missing: the error that says how to fetch it
            if not path.is_file():
                raise assets.no_weights_file("codec", "codec.weights", cfg.weights, path, (
                    "rebuild it with python -m siren.demo_assets.codec" if cfg.weights == "demo" else ""))
            (self.dac, demo), self.weights_sha256 = load_hashed(path, load_dac)
            self.weights_label = self._label(path, demo)
        self.dac.eval().requires_grad_(False)

    def _label(self, path: Path, demo: bool) -> str:
        """The demo label only for the committed demo codec (by content: any build of the recipe marks its file
        demo, a smoke build's too), "pretrained" only for the published architecture in the cache, else the path."""
        if demo and DEMO_FILE.is_file() and self.weights_sha256 == sha256_file_once(DEMO_FILE):
            return DEMO_LABEL
        label = assets.label("dac_16khz", path, self.weights_sha256)
        published = all(getattr(self.dac, k, None) == DAC_KWARGS[k] for k in ("encoder_dim", "decoder_dim"))
        return label if label != "pretrained" or published else f"{assets.FILE_LABEL}{Path(path).resolve()}"

    @property
    def id(self) -> str:
        """Identity for cache keys: a changed weight file changes it."""
        return f"dac16k-{weights_tag(self.weights_sha256)}"

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


def weights_arg(label: str) -> str:
    """A codec's ``weights_label`` (as prepared directories record it) -> the ``codec.weights`` value."""
    if label.startswith(assets.FILE_LABEL):
        return label[len(assets.FILE_LABEL):]
    return "demo" if label == DEMO_LABEL else label


def weights_file(weights: str) -> Path:
    """The file a codec weights mode other than ``random`` loads: the published one, the demo one, or a path."""
    return assets.path("dac_16khz") if weights == "pretrained" else DEMO_FILE if weights == "demo" else Path(weights)


def load_dac(f: Path | BinaryIO):
    """A DAC .pth file (``state_dict`` + ``metadata.kwargs``, as descript-audio-codec saves it; a path or an open
    file) -> (the DAC built with the file's kwargs, whether the file is the project's demo codec).
    The quantizer, sample rate and hop must be the paper's; the widths may differ."""
    import dac

    ckpt, path = load_torch_file(f), f.name if hasattr(f, "read") else f
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: no 'state_dict' in the file; expected a DAC .pth (state_dict + metadata)")
    meta = ckpt.get("metadata", {})
    kwargs = {**DAC_KWARGS, **meta.get("kwargs", {})}
    if kwargs.get("latent_dim") is None:  # DAC's default, as its own files record it
        kwargs["latent_dim"] = kwargs["encoder_dim"] * 2 ** len(kwargs["encoder_rates"])
    hop = int(torch.tensor(kwargs["encoder_rates"]).prod())
    bad = {k: (kwargs[k], v) for k, v in PAPER_KWARGS.items() if kwargs[k] != v}
    if hop != HOP:
        bad["hop (product of encoder_rates)"] = (hop, HOP)
    if bad:
        raise WeightsMismatchError(f"{path} is not a 16 kHz 12 x 1024 x 8-d RVQ DAC with hop {HOP}: (file, expected) "
                                  f"differ for {bad}")
    model = dac.DAC(**kwargs)
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})  # demo files store fp16
    return model, bool(meta.get("demo", False))
