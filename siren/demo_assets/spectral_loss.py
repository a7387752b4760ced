"""The demo codec's reconstruction loss: multi-scale mel L1 (DAC's, fewer scales), plus waveform L1
(stage 1) or a multi-resolution STFT loss (stages 3-4)."""
from __future__ import annotations

import torch

from siren.codec import SAMPLE_RATE

MEL_SCALES = ((256, 32), (1024, 64), (2048, 128))  # (window, mel bands) of the multi-scale mel loss
STFT_WINDOWS = (256, 512, 1024, 2048)  # the decoder's multi-resolution STFT loss (hop = window / 4)


class SpectralLoss(torch.nn.Module):
    """Multi-scale mel L1 on log10 magnitudes (DAC's reconstruction loss, fewer scales), plus waveform
    L1 for the autoencoder (stage 1) or a multi-resolution STFT loss for the decoder on codes (stage 3)."""

    def __init__(self):
        super().__init__()
        from torchaudio.transforms import MelSpectrogram

        self.mels = torch.nn.ModuleList(MelSpectrogram(SAMPLE_RATE, n_fft=w, hop_length=w // 4, n_mels=m, power=1.0)
                                        for w, m in MEL_SCALES)

    def mel_l1(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum((m(y).clamp_min(1e-5).log10() - m(x).clamp_min(1e-5).log10()).abs().mean()
                   for m in self.mels) / len(self.mels)

    @staticmethod
    def stft(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Spectral convergence + log-magnitude L1 on linear-frequency STFTs (Parallel WaveGAN's
        multi-resolution loss): the linear-magnitude term weighs a missing loud partial, which the
        mel L1 averages with every quiet band."""
        total = 0
        for w in STFT_WINDOWS:
            win = torch.hann_window(w, device=y.device)
            Y, X = (torch.stft(s[:, 0], w, w // 4, window=win, return_complex=True).abs() for s in (y, x))
            sc = (Y - X).norm() / X.norm().clamp_min(1e-5)
            total = total + sc + ((Y + 1e-5).log10() - (X + 1e-5).log10()).abs().mean()
        return total / len(STFT_WINDOWS)

    def forward(self, y: torch.Tensor, x: torch.Tensor, waveform: bool = True) -> torch.Tensor:
        n = min(y.shape[-1], x.shape[-1])  # DAC's transposed convs come out a few samples short
        y, x = y[..., :n], x[..., :n]
        if waveform:
            return self.mel_l1(y, x) + (y - x).abs().mean()
        return self.mel_l1(y, x) + self.stft(y, x)
