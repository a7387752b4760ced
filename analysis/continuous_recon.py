"""Continuous tokens (paper/003) against the 12-layer RVQ: how much of the DAC latent a PCA of k axes
keeps, and what the decoded audio loses, beside the RVQ's own loss on the same clips.

The PCA is fitted on demo train clips (``train_per_class`` per class) and measured on one test clip per
class (decoding is slow); every candidate latent is decoded by the same DAC decoder. Columns: FVU =
||z-hat - z||^2 / ||z - mean||^2 over the test clips' frames, the mean theirs (0 = exact), SNR of the
decoded waveform against the decode of z itself (the codec's own ceiling), mel L1 of the decoded
waveform against the input audio (``analysis.rvq_depth``'s measure, so its RVQ-12 row reads on Figure 1b's scale).
The continuous family's own projection is fitted per prepared directory by ``python -m siren.data.latents``.

    python -m analysis.continuous_recon                          # the demo codec
    python -m analysis.continuous_recon codec=random dims=8,32   # the smoke-test codec: the code path only
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from analysis import prepared
from analysis.cli import command, int_list, out_dir, write_csv
from analysis.rvq_depth import mel_l1
from siren.config import check_numbers
from siren.errors import ConfigError
from siren.model.continuous.latent import LATENT_DIM, LatentProjection, dac_latent, decode_latent, rvq_latent


def fvu(approx: list[torch.Tensor], z: list[torch.Tensor]) -> float:
    """Fraction of variance unexplained over all frames of all clips ([D, T] each): sum ||z-hat - z||^2 /
    sum ||z - mean||^2, the mean the measured frames' own (0 = exact, 1 = no better than that mean; the train
    mean would also count its offset from these clips as variance explained)."""
    mean = torch.cat(z, 1).double().mean(1, keepdim=True)
    return float(sum((a.double() - b.double()).pow(2).sum() for a, b in zip(approx, z))
                 / sum((b.double() - mean).pow(2).sum() for b in z))


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (est - ref).pow(2).sum().clamp(min=1e-20)))


@dataclass
class Reconstruction:
    name: str  # "RVQ-12", "PCA-k" or "latent-1024"
    latent_fvu: float  # vs the continuous latent z, pooled over the test clips
    snr_db: float  # decoded waveform vs the decode of z itself (the codec's own ceiling)
    mel_l1_input: float  # mel L1 of the decoded waveform vs the input audio (rvq_depth.mel_l1)


@torch.no_grad()
def reconstruction(codec, train_wavs: list[torch.Tensor], test_wavs: list[torch.Tensor],
                   dims: list[int]) -> list[Reconstruction]:
    """Reconstruction error of PCA-reduced latents (fitted on train_wavs) and of the 12-layer RVQ, on test_wavs."""
    proj_full = LatentProjection.fit((dac_latent(codec, w) for w in train_wavs), LATENT_DIM, whiten=False)
    rows: dict[str, list] = {}
    latents: dict[str, list] = {}  # name -> [z-hat of each test clip]; "latent-1024": z itself
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
            latents.setdefault(name, []).append(zh[0])
            rows.setdefault(name, []).append((snr_db(ref, out), mel_l1(wav.reshape(-1)[:n].float(), out)))
    order = ["latent-1024", "RVQ-12", *(f"PCA-{k}" for k in dims)]
    return [Reconstruction(name, fvu(latents[name], latents["latent-1024"]),
                           *(sum(col) / len(col) for col in zip(*rows[name]))) for name in order]


def _truncate(full: LatentProjection, k: int) -> LatentProjection:
    """The first k axes of an unwhitened full fit (the k-dim PCA of the same data)."""
    proj = LatentProjection(k)
    proj.mean.copy_(full.mean)
    proj.basis.copy_(full.basis[:k])
    proj.scale.fill_(1.0)
    return proj


@dataclass
class ContinuousReconConfig:
    codec: str = "demo"  # codec weights: pretrained | random | demo | /path.pth
    dims: str = "8,32,128,1024"  # PCA sizes to measure
    train_per_class: int = 2  # demo train clips per class the PCA is fitted on
    out: str = ""

    def __post_init__(self):
        check_numbers(self, positive=("train_per_class",))


def run(cfg: ContinuousReconConfig) -> list[Path]:
    from siren.data.demo import CLASSES, clip

    dims = int_list(cfg.dims, "dims")
    if not dims or any(not 1 <= d <= LATENT_DIM for d in dims):
        raise ConfigError(f"dims={cfg.dims}: each PCA size must be in 1..{LATENT_DIM}")
    codec = prepared.build_codec(cfg.codec)
    train = [torch.from_numpy(clip(c, "train", k)[0]) for c in range(len(CLASSES)) for k in range(cfg.train_per_class)]
    test = [torch.from_numpy(clip(c, "test", 0)[0]) for c in range(len(CLASSES))]
    print(f"PCA fitted on {len(train)} demo train clips, measured on {len(test)} test clips; "
          f"{prepared.codec_words(codec)}")
    print(f"{'latent':<14}{'FVU':>12}{'SNR dB':>10}{'melL1':>10}")
    rows = reconstruction(codec, train, test, dims)
    for r in rows:
        print(f"{r.name:<14}{r.latent_fvu:>12.4f}{r.snr_db:>10.2f}{r.mel_l1_input:>10.3f}")
    prov = dict(codec=codec.id, weights=codec.weights_label, n_train=len(train), n_test=len(test))
    return [write_csv(out_dir(cfg.out, "continuous_recon") / "reconstruction.csv",
                      [dict(asdict(r), **prov) for r in rows])]


if __name__ == "__main__":
    command("continuous_recon", ContinuousReconConfig, run, __doc__)
