"""Acoustic activity (appendix A: "segments with acoustic activity, SNR > 6 dB") from frame energies.

The paper does not say how it estimates SNR. Ours needs no reference noise and no model:

    e_t    = mean of x^2 over frame t (20 ms frames, the codec's hop, non-overlapping; real samples only)
    SNR_dB = 10 log10( (P95(e) + E0) / (P10(e) + E0) )        E0 = 1e-10 (-100 dB: digital silence is finite)

The 10th percentile of frame energy stands for the background (noise floor), the 95th for the
events above it. What it measures is *activity*: how far the loud frames rise above the quiet
ones. Stationary white noise scores ~1 dB (frame energies of 320 samples vary by ~8 %); an event
over a quiet background or followed by silence scores high. A perfectly steady sound (a constant
hum or tone) also scores ~0 dB: lower ``min_snr_db`` for corpora where those are wanted.
"""
from __future__ import annotations

import math

import torch

from siren.codec import HOP

E0 = 1e-10  # energy floor, -100 dB
NOISE_PCT, SIGNAL_PCT = 10.0, 95.0
ESTIMATOR = (f"frame-energy percentile ratio: 10*log10((P{SIGNAL_PCT:g}(e)+E0)/(P{NOISE_PCT:g}(e)+E0)), "
             f"e = mean square per {HOP}-sample frame at 16 kHz, a short last frame over its real samples, "
             f"E0={E0:g}")  # part of the filter's cache key: a changed estimator scores every clip again


def frame_energy(wav: torch.Tensor) -> torch.Tensor:
    """[N] -> [ceil(N / HOP)] mean square per non-overlapping frame, the last one over its real samples
    (averaged with padding zeros, a short last frame passed for a quieter noise floor: a clip of 3 frames +
    1 sample of steady noise scored 5 dB more than its 3 frames)."""
    n = wav.shape[-1]
    x = torch.nn.functional.pad(wav.double(), (0, -n % HOP)).reshape(-1, HOP)
    real = torch.full((x.shape[0],), float(HOP), dtype=torch.float64)
    real[-1] = n - HOP * (x.shape[0] - 1)
    return x.pow(2).sum(-1) / real


def snr_db(wav: torch.Tensor) -> float:
    """The activity SNR of a 16 kHz mono clip [N] (see the module docstring)."""
    if wav.numel() == 0:
        raise ValueError("empty clip has no SNR")
    e = frame_energy(wav)
    noise = torch.quantile(e, NOISE_PCT / 100).item()
    signal = torch.quantile(e, SIGNAL_PCT / 100).item()
    return 10 * math.log10((signal + E0) / (noise + E0))


def energy_db(wav: torch.Tensor) -> float:
    """10 log10(mean square + E0) of a clip: the loudness the crop filter compares crops by."""
    return 10 * math.log10(wav.double().pow(2).mean().item() + E0)
