"""ContinuousConfig: the continuous-token LM of paper/003 (Yang et al., ICML 2025, arXiv 2507.09834).

A causal transformer over continuous tokens (the DAC latent before quantization, optionally
PCA-reduced: ``siren.model.continuous.latent``) with cross-attention to the CLAP text states,
a per-token diffusion head (an MLP conditioned on the backbone output) and, as a training
option, masked next-token prediction (MNTP). Our copy of the paper is its abstract; every
value it does not give is our choice, listed in the README section for paper/003.

Scale presets (``scale=NAME`` with ``presets()``): ``cont-tiny`` for tests and the demo,
``cont-base`` / ``cont-large`` sized to the paper's 193M / 462M parameters (the sizes are the
abstract's; the widths and depths that reach them are ours).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from siren.errors import ConfigError

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v", "x0")


@dataclass
class ContinuousConfig:
    token_dim: int = 64  # width of a continuous token: 1024 (full DAC latent) or a PCA reduction
    # causal backbone (pre-norm blocks of siren.model.blocks: self-attn, cross-attn to text, MLP)
    dim: int = 768
    layers: int = 16
    attn_heads: int = 12
    mlp_ratio: int = 4
    text_dim: int = 768  # CLAP text token states
    # per-token diffusion head: residual MLP blocks with adaptive LayerNorm on (backbone output + time)
    head_width: int = 1024
    head_depth: int = 6
    schedule: str = "cosine"  # cosine (Nichol & Dhariwal 2021) | linear (Ho et al. 2020) betas
    train_steps: int = 1000  # diffusion steps T of the forward process
    sample_steps: int = 100  # default respaced steps at sampling (<= train_steps); per call overridable
    prediction: str = "v"  # what the head predicts: eps | v | x0 (eps is ill-conditioned at the end of "cosine")
    diffusion_batch_mul: int = 4  # noise draws per token per training step (cheap: the head is small)
    # masked next-token prediction: a fraction of the backbone's input tokens become a learned [MASK]
    mntp: bool = False
    mask_ratio: float = 0.3  # per sequence, round(mask_ratio * inputs) real input tokens are masked
    latent: str = ""  # id of the latent projection whose tokens the model reads (checkpoint identity)

    def __post_init__(self):
        def _key(k: str) -> str:  # siren.train's key (a grid cell's model.<k> becomes it: ablations.steps)
            return f"continuous.{k}"

        for key in ("token_dim", "dim", "layers", "attn_heads", "mlp_ratio", "text_dim", "head_width",
                    "head_depth", "train_steps", "sample_steps", "diffusion_batch_mul"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{_key(key)} must be >= 1, got {getattr(self, key)}")
        if self.dim % self.attn_heads:
            raise ConfigError(f"{_key('dim')}={self.dim} is not divisible by {_key('attn_heads')}={self.attn_heads}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{_key('schedule')} '{self.schedule}' is not allowed; allowed: {', '.join(SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"{_key('prediction')} '{self.prediction}' is not allowed; "
                              f"allowed: {', '.join(PREDICTIONS)}")
        if self.schedule == "linear" and self.train_steps <= 20:  # betas scaled by 1000/T reach 1 at T = 20
            raise ConfigError(f"{_key('schedule')}=linear needs {_key('train_steps')} > 20 (got "
                              f"{self.train_steps}): Ho et al.'s betas scaled to T steps end at 20/T, so abar "
                              f"reaches 0 (NaN); use cosine")
        if self.sample_steps > self.train_steps:
            raise ConfigError(f"{_key('sample_steps')}={self.sample_steps} exceeds {_key('train_steps')}="
                              f"{self.train_steps}: sampling respaces the training steps, it cannot add any")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"{_key('mask_ratio')} must be in [0, 1), got {self.mask_ratio}")


# name -> {field: value}. Base/Large: depth chosen so the totals land on the paper's sizes
# (printed with the difference by `python -m siren.model.params family=continuous scale=...`).
SCALES: dict[str, dict[str, Any]] = {
    "cont-tiny": dict(token_dim=8, dim=64, layers=2, attn_heads=4, head_width=64, head_depth=2),
    "cont-small": dict(token_dim=32, dim=256, layers=4, attn_heads=4, head_width=256, head_depth=3),
    "cont-base": dict(token_dim=64, dim=768, layers=16, attn_heads=12, head_width=1024, head_depth=7),
    "cont-large": dict(token_dim=64, dim=1024, layers=24, attn_heads=16, head_width=1280, head_depth=8),
}

# Sizes the paper states (abstract): total parameters of the LM, backbone + diffusion head.
PAPER_SIZES: dict[str, tuple[float, str]] = {
    "cont-base": (193e6, "abstract: Base"),
    "cont-large": (462e6, "abstract: Large"),
}


def presets(prefix: str = "") -> dict[str, dict[str, dict[str, Any]]]:
    """The ``scale`` preset group for ``siren.config.load_config`` (``prefix`` e.g. "model.")."""
    return {"scale": {name: {prefix + k: v for k, v in kv.items()} for name, kv in SCALES.items()}}
