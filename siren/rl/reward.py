"""Reward models for stage 2 (Eq. 8): R = cosine(phi_audio(D(codes)), phi_text(c)).

Every reward is called as ``reward(x, captions) -> Tensor[B]``; ``needs_audio`` says whether
x is the decoded 16 kHz waveform [B, N] or the codes [B, 12, T] themselves; ``name`` and
``weights_sha256`` identify the scoring model (eval compares them with its metric backbones).

- ``clap``: LAION-CLAP (siren.clap), the default here (demo scale). Its checkpoint is the CLAP-score
  metric's, so eval marks that metric "reward = metric" for runs aligned with it.
- ``imagebind``: ImageBind-Huge, the paper's choice and the paper-scale default (siren.rl.imagebind);
  needs the ``[imagebind]`` extra and its checkpoint, and says how to get them when either is missing.
- ``code_match``: a synthetic reward on codes for tests only (fraction of one layer's codes
  equal to a target value), so learning can be checked without audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from siren.codec import CODEBOOK_SIZE, N_LAYERS
from siren.config import check_numbers
from siren.errors import ConfigError


@dataclass
class RewardConfig:
    name: str = "clap"  # clap | imagebind | code_match (tests only)
    weights: str = "pretrained"  # pretrained | demo | random (smoke tests, labelled) | a checkpoint path
    seed: int = 0  # random-init seed for weights=random
    code_layer: int = 0  # code_match: which RVQ layer (0-based) ...
    code_value: int = 0  # ... must lie in [code_value, code_value + code_width)
    code_width: int = 1

    def __post_init__(self):
        if self.name not in ("clap", "imagebind", "code_match"):
            raise ConfigError(f"reward.name must be clap, imagebind or code_match, got {self.name!r}")
        check_numbers(self, "reward.", positive=("code_width",), nonneg=("seed", "code_layer", "code_value"))
        if self.code_layer >= N_LAYERS or self.code_value >= CODEBOOK_SIZE:  # an IndexError after out= was set up
            raise ConfigError(f"reward.code_layer={self.code_layer} reward.code_value={self.code_value}: a layer "
                              f"0..{N_LAYERS - 1} and a code 0..{CODEBOOK_SIZE - 1}")


class ClapReward:
    """Cosine of LAION-CLAP's audio and text embeddings (``Clap.score``). Pass ``clap`` to share
    the model that already encodes the text conditioning (same weights, one copy in memory)."""
    needs_audio = True
    name = "clap"

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 clap=None):
        from siren.clap import Clap, ClapConfig

        self.clap = clap if clap is not None else Clap(ClapConfig(weights=weights, seed=seed)).to(device)
        self.weights_label, self.weights_sha256 = self.clap.weights_label, self.clap.weights_sha256
        self.id = f"clap-{self.clap.id}"

    @torch.no_grad()
    def __call__(self, audio: Tensor, captions: list[str]) -> Tensor:
        return self.clap.score(audio, list(captions)).float()


class CodeMatchReward:
    """Tests only: the fraction of frames whose layer-``layer`` code lies in [value, value + width)
    (width 1: equals ``value``; a wider target gives an untrained policy some reward to start from)."""
    needs_audio = False
    name = "code_match"
    weights_label = "synthetic"
    weights_sha256 = None

    def __init__(self, layer: int = 0, value: int = 0, width: int = 1):
        self.layer, self.value, self.width = layer, value, width
        self.id = f"code-match-l{layer}-v{value}-w{width}"

    def __call__(self, codes: Tensor, captions: list[str]) -> Tensor:
        c = codes[:, self.layer]
        return ((c >= self.value) & (c < self.value + self.width)).float().mean(dim=-1)


def build_reward(cfg: RewardConfig, device: str | torch.device = "cpu", clap=None):
    """The reward named by ``cfg``; ``clap``: an already built ``siren.clap.Clap`` to reuse when
    its weights are the ones asked for."""
    if cfg.name == "clap":
        same = clap is not None and (clap.cfg.weights, clap.cfg.seed) == (cfg.weights, cfg.seed)
        return ClapReward(cfg.weights, cfg.seed, device, clap if same else None)
    if cfg.name == "imagebind":
        from siren.rl.imagebind import ImageBindReward

        return ImageBindReward(cfg.weights, cfg.seed, device)
    if cfg.name == "code_match":
        return CodeMatchReward(cfg.code_layer, cfg.code_value, cfg.code_width)
    raise ValueError(f"unknown reward.name '{cfg.name}'; valid: clap, imagebind, code_match")
