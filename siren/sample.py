"""Sampling (Algorithm 2): all K backbones advance one step with their KV caches, then the
residual decoders R_1..R_K run in order, each conditioned on the codes the earlier experts
just sampled at this step, sampling its m layers one at a time.

Caches: each backbone keeps a KV cache over time; each residual decoder keeps a small
per-step KV cache over its m+1 positions (h_t, then one condition per layer), reset every
step. ``SampleConfig(cached=False)`` recomputes the whole prefix every step instead (the
reference the benchmark and tests compare against).

Classifier-free guidance is not implemented: the paper disables it (appendix B) and the
stage-1 trainer has no condition dropout to train an unconditional branch.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

from siren.codec import CODEBOOK_SIZE, N_LAYERS
from siren.config import ConfigError
from siren.errors import NonFiniteError
from siren.model.collaborative import CollaborativeModel
from siren.model.expert import ExpertState

MIN_TEMPERATURE = 1e-4


@dataclass
class SampleConfig:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely codes; 0 = off
    top_p: float = 0.0  # nucleus: smallest set with probability >= top_p; 0 = off
    cached: bool = True  # KV caches; False recomputes the whole prefix every step (reference, slow)
    # family=continuous (paper/003) only: respaced diffusion steps per token; 0 = the model's continuous.sample_steps
    diffusion_steps: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails no '< 0' test; inf: uniform
            raise ConfigError(f"sample.temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T overflows float32 (inf, NaN probabilities)
            raise ConfigError(f"sample.temperature={self.temperature:g}: below {MIN_TEMPERATURE:g} sampling is argmax "
                              f"up to float overflow; give 0 for greedy decoding")
        if not 0 <= self.top_k <= CODEBOOK_SIZE:  # above the codebook it was off, and recorded on cards as given
            raise ConfigError(f"sample.top_k must be in 0..{CODEBOOK_SIZE} (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p must be in [0, 1] (0 = off), got {self.top_p}")
        if self.diffusion_steps < 0:
            raise ConfigError(f"sample.diffusion_steps must be >= 0 (0 = the model's own), got {self.diffusion_steps}")


@dataclass
class SampleInfo:
    distinct: torch.Tensor  # [B, 12] number of distinct codes each layer used over time
    collapsed: torch.Tensor  # [B] bool: every layer repeated a single code for all frames


def sample_token(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> codes [B] with temperature / top-k / top-p."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < cfg.top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # mass before this code already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def start(model: CollaborativeModel, states: torch.Tensor, mask: torch.Tensor,
          cached: bool = True) -> list[ExpertState]:
    return [e.start(states, mask, cached) for e in model.experts]


def sample_step(model: CollaborativeModel, run: list[ExpertState], codes: torch.Tensor, cfg: SampleConfig,
                generator: torch.Generator) -> None:
    """Fill codes[:, :, t] for t = the experts' current step (Algorithm 2, one iteration of line 1)."""
    t = run[0].t
    hs = [e.backbone_step(s, codes) for e, s in zip(model.experts, run)]  # all F_k: need only codes < t
    codes_t = codes[:, :, t]  # a view: layers are written in as they are sampled
    for k, (expert, state, h) in enumerate(zip(model.experts, run, hs)):  # R_1..R_K in order
        for i, j in enumerate(expert.layers):
            logits = expert.layer_logits(state, h, codes_t, i)  # reads codes_t[:, :j] only
            if not torch.isfinite(logits).all():
                raise NonFiniteError(f"non-finite logits at step t={t}, expert k={k}, RVQ layer {j} "
                                         f"(check the checkpoint for NaN/inf weights)")
            codes_t[:, j] = sample_token(logits, cfg, generator)


def text_inputs(text) -> tuple[torch.Tensor, torch.Tensor]:
    """A TextStates (``.states``, ``.mask``) or a (states, mask) pair."""
    if hasattr(text, "states") and hasattr(text, "mask"):
        return text.states, text.mask
    states, mask = text
    return states, mask


@torch.no_grad()
def generate_with_info(model: CollaborativeModel, text, n_frames: int, cfg: SampleConfig = SampleConfig(),
                       seed: int = 0, progress: bool | None = None) -> tuple[torch.Tensor, SampleInfo]:
    """Sample codes [B, 12, n_frames] for a batch of prompts; see ``generate``."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    states, mask = text_inputs(text)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    states, mask = states.to(device, dtype), mask.to(device).bool()
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator(device).manual_seed(seed)
        codes = torch.zeros(states.shape[0], N_LAYERS, n_frames, dtype=torch.long, device=device)
        run = start(model, states, mask, cfg.cached)
        for _ in tqdm(range(n_frames), desc="sampling", unit="frame",
                      disable=None if progress is None else not progress):
            sample_step(model, run, codes, cfg, generator)
    finally:
        model.train(was_training)
    distinct = torch.tensor([[len(torch.unique(codes[b, j])) for j in range(N_LAYERS)]
                             for b in range(codes.shape[0])])
    collapsed = (distinct == 1).all(1) if n_frames > 1 else torch.zeros(codes.shape[0], dtype=torch.bool)
    return codes, SampleInfo(distinct, collapsed)


def generate(model: CollaborativeModel, text, n_frames: int, cfg: SampleConfig = SampleConfig(), seed: int = 0,
             progress: bool | None = None) -> torch.Tensor:
    """Codes LongTensor [B, 12, n_frames] for text (TextStates or (states [B,L,768], mask [B,L])).

    Same model, text, config and seed -> same codes (seeded torch.Generator). Non-finite logits
    raise NonFiniteError (a FloatingPointError) naming step, expert and layer; a collapsed sample (one code per
    layer for all frames) is warned about (``generate_with_info`` returns the flags)."""
    codes, info = generate_with_info(model, text, n_frames, cfg, seed, progress)
    if info.collapsed.any():
        warnings.warn(f"sampling collapsed for batch rows {info.collapsed.nonzero().flatten().tolist()}: "
                      f"every RVQ layer repeats one code over all {n_frames} frames", RuntimeWarning, stacklevel=2)
    return codes
