"""Continuous tokens: the DAC 16 kHz latent before quantization, optionally reduced by a fitted PCA.

The encoder's output z [B, 1024, T] (50 frames/s) is what the 12-layer RVQ quantizes; the
continuous LM models z itself, through an affine map fitted on training latents and stored as
safetensors (``LatentProjection``):

    token = ((z - mean) @ basis^T) / scale        basis: the top-k principal axes [k, 1024]
    z-hat = (token * scale) @ basis + mean        decoded by the same DAC decoder

k = 1024 keeps every axis (an orthogonal rotation: lossless); k < 1024 drops the axes of least
variance. ``scale`` is each kept axis's standard deviation (whitening), so every token dimension
has unit variance on the training set, the scale the diffusion head's noise assumes.

``python -m siren.data.latents`` fits it per prepared directory; ``python -m analysis.continuous_recon``
measures the reconstruction error of reduced latents against the 12-layer RVQ's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from siren.codec import HOP, N_LAYERS, SAMPLE_RATE
from siren.errors import CheckpointError, ConfigError
from siren.io import save_tensors

LATENT_DIM = 1024  # DAC 16 kHz latent width (encoder_dim 64 * 2**4)


@torch.no_grad()
def dac_latent(codec, wav: torch.Tensor) -> torch.Tensor:
    """wav [N] or [B, N] or [B, 1, N] at 16 kHz -> z [B, 1024, ceil(N / 320)], the encoder output before the RVQ."""
    x = wav.reshape(-1, 1, wav.shape[-1]).to(codec.device, torch.float32)
    return codec.dac.encoder(codec.dac.preprocess(x, SAMPLE_RATE))


@torch.no_grad()
def rvq_latent(codec, z: torch.Tensor, n_layers: int = N_LAYERS) -> torch.Tensor:
    """The RVQ's reconstruction sum_j f-hat^j of z [B, 1024, T] with the first ``n_layers`` layers (paper/002 Eq. 1)."""
    return codec.dac.quantizer(z.to(codec.device), n_quantizers=n_layers)[0]


@torch.no_grad()
def decode_latent(codec, z: torch.Tensor) -> torch.Tensor:
    """z [B, 1024, T] -> wav [B, T * 320] through the DAC decoder (the path ``Codec.decode`` takes after from_codes)."""
    wav = codec.dac.decode(z.to(codec.device, torch.float32))[:, 0]
    n = z.shape[-1] * HOP
    return torch.nn.functional.pad(wav, (0, max(0, n - wav.shape[-1])))[:, :n]


class LatentProjection(nn.Module):
    """The fitted affine map between DAC latents [B, 1024, T] and model tokens [B, T, k] (buffers only)."""

    def __init__(self, dim: int, latent_dim: int = LATENT_DIM):
        super().__init__()
        if not 1 <= dim <= latent_dim:
            raise ConfigError(f"projection dim must be in [1, {latent_dim}], got {dim}")
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("basis", torch.zeros(dim, latent_dim))
        self.register_buffer("scale", torch.ones(dim))
        self.id = ""
        self.explained = float("nan")  # fraction of the training variance kept (set by fit)

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @classmethod
    @torch.no_grad()
    def fit(cls, latents, dim: int, whiten: bool = True) -> "LatentProjection":
        """PCA of the frames of ``latents`` (an iterable of z [1024, T] or [B, 1024, T]), in float64."""
        n, total, outer = 0, torch.zeros(LATENT_DIM, dtype=torch.float64), torch.zeros(LATENT_DIM, LATENT_DIM,
                                                                                      dtype=torch.float64)
        for z in latents:
            frames = z.reshape(-1, *z.shape[-2:]).transpose(1, 2).reshape(-1, z.shape[-2]).double().cpu()
            n, total, outer = n + len(frames), total + frames.sum(0), outer + frames.T @ frames
        if n < 2:
            raise ConfigError(f"a latent projection needs at least 2 frames to fit, got {n}")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        var, vecs = torch.linalg.eigh(cov)  # ascending
        var, vecs = var.flip(0)[:dim].clamp(min=0), vecs.flip(1)[:, :dim]
        vecs = vecs * torch.where(vecs.sum(0) < 0, -1.0, 1.0)  # a fixed sign per axis: the same fit twice is identical
        proj = cls(dim)
        proj.mean.copy_(mean)
        proj.basis.copy_(vecs.T)
        if whiten:  # a floor keeps axes of (numerically) zero variance finite
            proj.scale.copy_(var.sqrt().clamp(min=1e-6 * float(var[0].sqrt()) + 1e-12))
        proj.explained = float(var.sum() / cov.diagonal().sum())
        proj.id = f"pca{dim}-{'w' if whiten else 'r'}-n{n}"
        return proj

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 1024, T] -> tokens [B, T, k]."""
        return ((z.transpose(1, 2) - self.mean) @ self.basis.T) / self.scale

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, k] -> z-hat [B, 1024, T]."""
        return ((tokens * self.scale) @ self.basis + self.mean).transpose(1, 2)

    def save(self, path: str | Path, codec_id: str = "") -> None:
        meta = {"dim": str(self.dim), "id": self.id, "codec": codec_id}
        save_tensors(path, {"mean": self.mean, "basis": self.basis, "scale": self.scale}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "LatentProjection":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"latent projection {path} does not exist; python -m siren.data.latents "
                                  f"data=PREP dim=k fits one per prepared directory (or LatentProjection.fit + save)")
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        if set(tensors) != {"mean", "basis", "scale"} or tensors["basis"].shape[0] != tensors["scale"].shape[0]:
            raise CheckpointError(f"{path} is not a latent projection (tensors {sorted(tensors)})")
        proj = cls(tensors["basis"].shape[0], tensors["basis"].shape[1])
        proj.load_state_dict(tensors)
        proj.id = meta.get("id", "")
        return proj
