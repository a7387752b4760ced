"""Reconstruction error of continuous tokens (full and PCA-reduced DAC latents) against the 12-layer RVQ.

    python -m siren.model.continuous.recon codec.weights=random dims=8,32,128,1024 [out=pca64.safetensors dim=64]

PCA fitted on the demo train clips (2 per class), measured on one test clip per class; every
candidate latent is decoded by the same DAC decoder. Columns: FVU = ||z-hat - z||^2 / ||z - mean||^2
(0 = exact), SNR of the decoded waveform against the decode of z itself (the codec's own ceiling),
log-spectrum L1 of the decoded waveform against the input audio.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from siren.codec import CodecConfig
from siren.config import load_config
from siren.model.continuous.latent import LATENT_DIM, LatentProjection, dac_latent, decode_latent, rvq_latent

log = logging.getLogger(__name__)


def fvu(approx: torch.Tensor, z: torch.Tensor, mean: torch.Tensor) -> float:
    """Fraction of variance unexplained: ||z-hat - z||^2 / ||z - mean||^2 over all frames (0 = exact)."""
    return float((approx - z).pow(2).sum() / (z - mean[:, None]).pow(2).sum())


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (est - ref).pow(2).sum().clamp(min=1e-20)))


def log_spec_l1(ref: torch.Tensor, est: torch.Tensor, n_fft: int = 1024) -> float:
    """Mean |log(|STFT ref| + 1e-5) - log(|STFT est| + 1e-5)| (hop n_fft/4, Hann)."""
    win = torch.hann_window(n_fft)
    spec = lambda x: torch.stft(x, n_fft, n_fft // 4, window=win, return_complex=True).abs()  # noqa: E731
    return float((torch.log(spec(ref) + 1e-5) - torch.log(spec(est) + 1e-5)).abs().mean())


@dataclass
class Reconstruction:
    name: str  # "RVQ-12", "PCA-k" or "latent-1024"
    latent_fvu: float  # vs the continuous latent z
    snr_db: float  # decoded waveform vs the decode of z itself (the codec's own ceiling)
    spec_l1_input: float  # log-spectrum L1 of the decoded waveform vs the input audio


@torch.no_grad()
def reconstruction(codec, train_wavs: list[torch.Tensor], test_wavs: list[torch.Tensor],
                   dims: list[int]) -> list[Reconstruction]:
    """Reconstruction error of PCA-reduced latents (fitted on train_wavs) and of the 12-layer RVQ, on test_wavs."""
    proj_full = LatentProjection.fit((dac_latent(codec, w) for w in train_wavs), LATENT_DIM, whiten=False)
    rows: dict[str, list] = {}
    for wav in test_wavs:
        z = dac_latent(codec, wav)
        n = wav.shape[-1]
        ref = decode_latent(codec, z)[0, :n]
        cands = {"latent-1024": z, "RVQ-12": rvq_latent(codec, z)}
        for k in dims:
            proj = _truncate(proj_full, k)
            cands[f"PCA-{k}"] = proj.decode(proj.encode(z))
        for name, zh in cands.items():
            out = decode_latent(codec, zh)[0, :n]
            rows.setdefault(name, []).append((fvu(zh[0], z[0], proj_full.mean), snr_db(ref, out),
                                              log_spec_l1(wav.reshape(-1)[:n].float(), out)))
    order = ["latent-1024", "RVQ-12", *(f"PCA-{k}" for k in dims)]
    return [Reconstruction(name, *(sum(col) / len(col) for col in zip(*rows[name]))) for name in order]


def _truncate(full: LatentProjection, k: int) -> LatentProjection:
    """The first k axes of an unwhitened full fit (the k-dim PCA of the same data)."""
    proj = LatentProjection(k)
    proj.mean.copy_(full.mean)
    proj.basis.copy_(full.basis[:k])
    proj.scale.fill_(1.0)
    return proj


@dataclass
class LatentCLIConfig:
    codec: CodecConfig = field(default_factory=CodecConfig)
    dims: str = "8,32,128,1024"  # PCA sizes to measure (comma-separated)
    out: str = ""  # if set: fit a whitened projection of ``dim`` axes on the train clips and save it here
    dim: int = 64


def main(argv: list[str] | None = None) -> None:
    from siren import cli
    from siren.codec import Codec
    from siren.data.demo import CLASSES, clip

    cfg = load_config(LatentCLIConfig, cli.start(argv))
    codec = Codec(cfg.codec)
    dims = [int(d) for d in cfg.dims.split(",")]
    train = [torch.from_numpy(clip(c, "train", k)[0]) for c in range(len(CLASSES)) for k in range(2)]
    test = [torch.from_numpy(clip(c, "test", 0)[0]) for c in range(len(CLASSES))]  # one per class: decoding is slow
    log.info("codec weights: %s; PCA fitted on %d demo train clips, measured on %d test clips",
             codec.weights_label.upper() if codec.weights_label == "random" else codec.weights_label,
             len(train), len(test))
    print(f"{'latent':<14}{'FVU':>12}{'SNR dB':>10}{'specL1':>10}")
    for r in reconstruction(codec, train, test, dims):
        print(f"{r.name:<14}{r.latent_fvu:>12.4f}{r.snr_db:>10.2f}{r.spec_l1_input:>10.3f}")
    if cfg.out:
        proj = LatentProjection.fit((dac_latent(codec, w) for w in train), cfg.dim)
        proj.save(cfg.out, codec.id)
        print(json.dumps({"projection": cfg.out, "id": proj.id, "explained": round(proj.explained, 4)}))


if __name__ == "__main__":
    from siren import cli

    cli.run(main, LatentCLIConfig, __doc__)
