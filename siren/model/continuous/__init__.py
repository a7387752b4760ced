"""The continuous-token model family of paper/003 (causal LM + per-token diffusion head + MNTP)."""
from siren.model.continuous.config import PAPER_SIZES, SCALES, ContinuousConfig, presets
from siren.model.continuous.diffusion import DiffusionHead
from siren.model.continuous.latent import LatentProjection, dac_latent, decode_latent, rvq_latent
from siren.model.continuous.model import ContinuousLM, ContinuousLoss, ContinuousState

__all__ = ["ContinuousConfig", "ContinuousLM", "ContinuousLoss", "ContinuousState", "DiffusionHead",
           "LatentProjection", "PAPER_SIZES", "SCALES", "dac_latent", "decode_latent", "presets", "rvq_latent"]
