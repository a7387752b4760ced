"""The continuous-token LM of paper/003: causal backbone over continuous tokens + per-token diffusion head.

- Tokens x_t [k]: the DAC latent of frame t through the fitted ``LatentProjection`` (k = token_dim).
- Backbone (causal over time, text by cross-attention in every block; the discrete family's
  ``Backbone`` with its blocks, positions and KV caches): input at step t is ``sos`` for t = 0,
  else W_in x_{t-1}; output z_t.
- Diffusion head: p(x_t | z_t), trained with the denoising loss on every valid frame
  (``diffusion_batch_mul`` noise draws per token), sampled with ``steps`` respaced DDPM steps.
- MNTP (``mntp=true``, training mode only): in each sequence, m = floor(mask_ratio * (n - 1) + 1/2)
  of the n - 1 real input tokens (inputs at steps 1..n-1, i.e. x_0..x_{n-2}; never ``sos``,
  never padding), drawn uniformly without replacement, are replaced by one learned [MASK]
  vector in model space. The targets do not change: every valid frame t still predicts x_t,
  so a prediction whose own input is masked (and later ones that attend to it) must reach
  further back. Sampling never masks. See the README section on paper/003 for why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from siren.errors import ConfigError
from siren.model.blocks import KVCache, TextKV
from siren.model.config import ARCHS, ModelConfig
from siren.model.continuous.config import ContinuousConfig
from siren.model.continuous.diffusion import DiffusionHead
from siren.model.continuous.latent import LatentProjection
from siren.model.expert import Backbone, check_inputs


@dataclass
class ContinuousLoss:
    loss: torch.Tensor  # denoising loss averaged over valid frames and noise draws
    frames: int  # valid frames averaged over
    masked: int  # input tokens replaced by [MASK] (MNTP; 0 otherwise)


@dataclass
class ContinuousState:
    """Per-generation state for incremental sampling."""
    text: list[TextKV]
    caches: list[KVCache] | None  # None: recompute the whole prefix every step
    t: int = 0


def _backbone_config(cfg: ContinuousConfig) -> ModelConfig:
    """The discrete family's backbone settings for the same width/depth (no decoder, no code tables): the
    first wave's blocks (``arch=legacy``: GELU MLP of mlp_ratio * d, self- then cross-attention), which the
    Base/Large sizes of paper/003 were fitted with."""
    return ModelConfig(**{**ARCHS["legacy"], "mlp_hidden": cfg.mlp_ratio * cfg.dim}, distribution="1-12",
                       conditioning="none", decoder_layers=0, dim=cfg.dim, main_layers=cfg.layers,
                       attn_heads=cfg.attn_heads, text_dim=cfg.text_dim)


class ContinuousLM(nn.Module):
    def __init__(self, cfg: ContinuousConfig, projection: LatentProjection | None = None):
        """``projection``: the latent projection the tokens come from (held as buffers so a checkpoint
        decodes on its own); None leaves a placeholder of width token_dim for ``load_state_dict``."""
        super().__init__()
        if projection is not None and projection.dim != cfg.token_dim:
            raise ConfigError(f"the latent projection has {projection.dim} dims but model.token_dim={cfg.token_dim}")
        if projection is not None and cfg.latent and projection.id and projection.id != cfg.latent:
            raise ConfigError(f"model.latent='{cfg.latent}' but the projection given is '{projection.id}': tokens "
                              f"from another projection mean something else; load the matching file")
        self.cfg = cfg
        self.projection = projection if projection is not None else LatentProjection(cfg.token_dim)
        self.inp = nn.Linear(cfg.token_dim, cfg.dim)  # W_in: token -> model space
        # the [MASK] vector of MNTP; absent without it (a parameter no step uses would trip DDP)
        self.mask = nn.Parameter(torch.zeros(cfg.dim)) if cfg.mntp else None
        self.backbone = Backbone(_backbone_config(cfg))
        self.head = DiffusionHead(cfg.token_dim, cfg.dim, cfg.head_width, cfg.head_depth, schedule=cfg.schedule,
                                  train_steps=cfg.train_steps, prediction=cfg.prediction)
        self._init_weights()

    def _init_weights(self):
        std = 0.02
        for module in [self.inp, *self.backbone.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.backbone.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * depth)
            for out in (block.self_attn.out, block.mlp.down, block.cross_attn.out):
                nn.init.normal_(out.weight, 0.0, std / math.sqrt(2 * len(self.backbone.blocks)))
        nn.init.normal_(self.backbone.sos, 0.0, std)
        if self.mask is not None:
            nn.init.normal_(self.mask, 0.0, std)

    # ---- teacher-forced training -----------------------------------------------------------

    def mntp_mask(self, frame_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool [B, T]: which backbone inputs MNTP replaces by [MASK]. Input position t >= 1 carries x_{t-1};
        a row with n valid frames has n - 1 real inputs, of which exactly floor(mask_ratio * (n - 1) + 1/2),
        drawn uniformly without replacement, are masked."""
        B, T = frame_mask.shape
        real = torch.zeros_like(frame_mask)  # position 0 is sos; position t reads x_{t-1}, used if frame t is valid
        real[:, 1:] = frame_mask[:, 1:] & frame_mask[:, :-1]
        n_mask = torch.floor(self.cfg.mask_ratio * real.sum(1).double() + 0.5).long()  # rounded half up
        score = torch.rand(B, T, device=frame_mask.device, generator=generator).masked_fill(~real, 2.0)
        rank = score.argsort(1).argsort(1)  # uniform random order among the real inputs, then the rest
        return rank < n_mask[:, None]

    def inputs(self, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T, k] -> backbone inputs [B, T, d]: sos, W_in x_0, ..., W_in x_{T-2} ([MASK] where ``masked``)."""
        if masked is not None and self.mask is None:
            raise ValueError("MNTP masks need a model built with mntp=true (it holds the [MASK] vector)")
        B = tokens.shape[0]
        x = torch.cat([self.backbone.sos.expand(B, 1, -1), self.inp(tokens[:, :-1])], 1)
        return x if masked is None else torch.where(masked[..., None], self.mask.to(x.dtype), x)

    def hidden(self, tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
               masked: torch.Tensor | None = None) -> torch.Tensor:
        """z_t [B, T, d] for every step from teacher-forced tokens [B, T, k] (z_t reads tokens < t only)."""
        check_inputs(None, text, text_mask, self.cfg.text_dim)
        if tokens.dim() != 3 or tokens.shape[-1] != self.cfg.token_dim or tokens.shape[0] != text.shape[0]:
            raise ValueError(f"tokens must be [B, T, {self.cfg.token_dim}] with B = {text.shape[0]}; "
                             f"got {tuple(tokens.shape)}")
        return self.backbone(self.inputs(tokens, masked), self.backbone.text_kv(text, text_mask))

    def loss(self, batch: dict, generator: torch.Generator | None = None) -> ContinuousLoss:
        """Denoising loss on a batch: latents [B, T, k] (projected tokens), frame_mask [B, T], text [B, L, 768],
        text_mask [B, L]. MNTP masks inputs only in training mode."""
        tokens, frame_mask = batch["latents"], batch["frame_mask"].bool()
        n = int(frame_mask.sum())
        if n == 0:
            raise ValueError("batch has no valid frame (frame_mask is all False)")
        if not torch.isfinite(tokens[frame_mask]).all():
            raise ValueError("latents hold non-finite values at valid frames")
        masked = self.mntp_mask(frame_mask, generator) if self.cfg.mntp and self.training else None
        z = self.hidden(tokens, batch["text"], batch["text_mask"], masked)[frame_mask]  # [n, d]
        r = self.cfg.diffusion_batch_mul
        per_token = self.head.loss(tokens[frame_mask].repeat(r, 1), z.repeat(r, 1), generator)
        return ContinuousLoss(per_token.mean(), n, int(masked.sum()) if masked is not None else 0)

    # ---- KV-cached sampling ----------------------------------------------------------------

    def start(self, text: torch.Tensor, text_mask: torch.Tensor, cached: bool = True) -> ContinuousState:
        check_inputs(None, text, text_mask, self.cfg.text_dim)
        caches = [KVCache() for _ in self.backbone.blocks] if cached else None
        return ContinuousState(self.backbone.text_kv(text, text_mask), caches)

    def step(self, state: ContinuousState, tokens: torch.Tensor) -> torch.Tensor:
        """z_t [B, d] for t = state.t from tokens [B, >= t, k] of the steps before t."""
        t, B = state.t, tokens.shape[0]
        if state.caches is not None:  # one new position attending to the cached past
            x = self.backbone.sos.expand(B, 1, -1) if t == 0 else self.inp(tokens[:, t - 1: t])
            z = self.backbone(x, state.text, state.caches, start=t)[:, -1]
        else:  # the whole prefix again
            z = self.backbone(self.inputs(tokens[:, : t + 1]), state.text)[:, -1]
        state.t = t + 1
        return z

    @torch.no_grad()
    def generate(self, text_states: torch.Tensor, text_mask: torch.Tensor, n_frames: int, *,
                 steps: int | None = None, temperature: float = 1.0, seed: int = 0,
                 cached: bool = True) -> torch.Tensor:
        """Tokens [B, n_frames, k] for a batch of prompts; ``decode`` turns them into DAC latents.

        Same model, text, arguments and seed -> same tokens: each step draws from one seeded generator
        in a fixed order (x_T, then the noise of each diffusion step), cached or not."""
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        steps = self.cfg.sample_steps if steps is None else steps
        p = next(self.parameters())
        text_states, text_mask = text_states.to(p.device, p.dtype), text_mask.to(p.device).bool()
        was_training = self.training
        self.eval()
        try:
            generator = torch.Generator(p.device).manual_seed(seed)
            tokens = torch.zeros(text_states.shape[0], n_frames, self.cfg.token_dim, device=p.device, dtype=p.dtype)
            state = self.start(text_states, text_mask, cached)
            for t in range(n_frames):
                z = self.step(state, tokens)
                tokens[:, t] = self.head.sample(z, steps, temperature, generator)
                if not torch.isfinite(tokens[:, t]).all():
                    raise FloatingPointError(f"non-finite token sampled at step t={t} "
                                             f"(check the checkpoint for NaN/inf weights)")
        finally:
            self.train(was_training)
        return tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T, k] -> DAC latents [B, 1024, T] (``latent.decode_latent`` makes the waveform)."""
        return self.projection.decode(tokens.float())
