"""Per-token diffusion head: p(x | z) of one continuous token x given the backbone output z.

Paper/003 models "the continuous distribution of the next continuous-valued token" with
token-wise diffusion; the form below (a small residual MLP with adaptive LayerNorm, trained
with the DDPM denoising loss, sampled by ancestral DDPM on respaced steps with a temperature
on the noise) follows the diffusion loss of MAR (Li et al., 2024, "Autoregressive Image
Generation without Vector Quantization"), which the paper's abstract does not name: our choice.

- Forward process (Ho et al. 2020, Eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
- Schedules: "linear" betas 1e-4..0.02 (Ho et al., scaled to T steps), "cosine"
  abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008 (Nichol & Dhariwal 2021, Eq. 17).
- Targets: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, section 4).
- Sampling: DDPM posterior q(x_{t-1} | x_t, x0-hat) (Ho et al. Eq. 6-7) on an evenly respaced
  subset of the T steps (Nichol & Dhariwal, section 4), fixed variance beta-tilde; ``temperature``
  scales the noise std of each step (MAR); temperature 0 is the deterministic posterior-mean chain.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def alpha_bars(schedule: str, steps: int) -> torch.Tensor:
    """abar_t for t = 0..steps-1 (float64)."""
    if schedule == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        f = lambda t: torch.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        t = torch.arange(steps + 1, dtype=torch.float64)
        betas = (1 - f(t[1:]) / f(t[:-1])).clamp(max=0.999)  # Nichol & Dhariwal clip betas at 0.999
    else:
        raise ValueError(f"unknown noise schedule '{schedule}' (cosine | linear)")
    return torch.cumprod(1 - betas, 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of (possibly respaced) timesteps t [N] -> [N, dim] (the transformer position code)."""
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freq[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


class AdaLNBlock(nn.Module):
    """LayerNorm modulated by the condition (shift, scale, gate), then an MLP, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, -1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """eps/v/x0-prediction network f(x_t, t, z) for one token, conditioned on z (backbone output)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, *, schedule: str = "cosine",
                 train_steps: int = 1000, prediction: str = "eps"):
        super().__init__()
        self.token_dim, self.train_steps, self.prediction = token_dim, train_steps, prediction
        self.register_buffer("abar", alpha_bars(schedule, train_steps).float(), persistent=False)
        self.inp = nn.Linear(token_dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [*(b.ada[-1] for b in self.blocks), self.final_ada[-1], self.out]:  # start as identity / zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t [N, token_dim], t [N] (indices into the T training steps), z [N, cond_dim] -> prediction."""
        c = self.time(timestep_embedding(t, self.inp.out_features)) + self.cond(z)
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)

    def loss(self, x0: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising loss per token [N] (mean over dims) at one uniform t per token (Ho et al. Eq. 14)."""
        t = torch.randint(0, self.train_steps, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        a = self.abar[t].to(x0.dtype)[:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return (self(x_t, t, z).float() - target.float()).pow(2).mean(-1)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = self(x_t, t, z)
        a = self.abar[t].to(x_t.dtype)[:, None]
        if self.prediction == "eps":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if self.prediction == "v":  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
            return a.sqrt() * x_t - (1 - a).sqrt() * out
        return out

    def respaced(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [steps] descending, abar of each): an evenly spaced subset from T-1 (down to 0 if steps > 1)."""
        if not 1 <= steps <= self.train_steps:
            raise ValueError(f"diffusion sampling steps must be in [1, {self.train_steps}], got {steps}")
        ts = torch.linspace(self.train_steps - 1, 0, steps, device=self.abar.device).round().long()
        return ts, self.abar[ts]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, steps: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of z [N, cond_dim] -> x0 [N, token_dim].
        Draws from ``generator``: x_T, then one noise per step but the last."""
        ts, abar = self.respaced(steps)
        x = torch.randn(z.shape[0], self.token_dim, device=z.device, dtype=z.dtype, generator=generator)
        for i, t in enumerate(ts):
            a_t = abar[i]
            a_prev = abar[i + 1] if i + 1 < len(ts) else abar.new_tensor(1.0)
            beta = 1 - a_t / a_prev  # the respaced step's beta (Nichol & Dhariwal, section 4)
            x0 = self.predict_x0(x, t.expand(z.shape[0]), z)
            # posterior mean (Ho et al. Eq. 7): coefficients of x0-hat and x_t
            mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
            if i + 1 < len(ts):
                var = beta * (1 - a_prev) / (1 - a_t)
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = mean + temperature * var.sqrt() * noise
            else:
                x = mean
        return x
