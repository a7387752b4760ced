"""Metric backbones behind one interface: PANNs Cnn14 (FD, KL, IS), VGGish (FAD), LAION-CLAP (CLAP score).

Each backbone takes clips at their own sample rate and resamples them with
``torchaudio.functional.resample`` (settings in ``RESAMPLER``) to the rate its network was
trained at. ``prepare`` turns one clip into the network's input, ``embed_batch`` runs a batch of
prepared inputs that share ``batch_key`` (equal shapes, so batching never pads: a batched result
equals the one-clip result). ``protocol()`` lists everything that shapes the numbers; it goes into
the protocol card and into the embedding cache key with ``id`` (name + weight hash).

Weights: ``pretrained`` loads the file from the assets cache (``siren.assets.require``) with
``torch.load(weights_only=True)``; ``random`` (seeded) is the explicit smoke-test mode and makes
``weights_sha256`` read ``random-seed<k>``.
"""
from __future__ import annotations

import importlib.util
from functools import cached_property
import sys
from abc import ABC, abstractmethod
import types
from pathlib import Path
from typing import Hashable

import numpy as np
import torch
from torch import nn

from eval.audio import Clip
from siren import assets

RESAMPLER = {"function": "torchaudio.functional.resample", "resampling_method": "sinc_interp_hann",
             "lowpass_filter_width": 6, "rolloff": 0.99}

# The 16 kHz Cnn14 (Cnn14_16k_mAP=0.438.pth), as audioldm_eval builds it for sampling_rate=16000.
PANNS_16K = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                 classes_num=527)


def resample(wav: torch.Tensor, sr: int, target: int) -> torch.Tensor:
    if sr == target:
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, sr, target, lowpass_filter_width=RESAMPLER["lowpass_filter_width"],
                       rolloff=RESAMPLER["rolloff"], resampling_method=RESAMPLER["resampling_method"])


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Backbone(ABC):
    """Common interface; subclasses set ``name``, ``sample_rate``, ``outputs``, ``asset`` and the methods below.

    The identity (``id``, ``weights_sha256``, ``protocol()``) is known at construction; the network
    itself is built on first use (``net``), so an evaluation served entirely from the embedding
    cache never builds or loads one.
    """
    name: str
    sample_rate: int
    outputs: tuple[str, ...]
    asset: str  # siren.assets name of the pretrained weights

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        if weights == "random":
            self.weights_path, self.weights_sha256 = None, f"random-seed{seed}"
        elif weights == "pretrained":
            self.weights_path = assets.require(self.asset)
            self.weights_sha256 = assets.sha256(self.weights_path)
        else:
            raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}")
        self.weights_label, self.seed, self.device = weights, seed, torch.device(device)

    @cached_property
    def net(self) -> nn.Module:
        if self.weights_path is None:
            net = _seeded(self.seed, self.build)
        else:
            net = self.build()
            self.load_weights(net, _load_state(self.weights_path))
        return net.eval().requires_grad_(False).to(self.device)

    @abstractmethod
    def build(self) -> nn.Module:
        """The network with freshly initialised weights."""

    def load_weights(self, net: nn.Module, state: dict) -> None:
        net.load_state_dict(state)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.weights_sha256[:16]}"

    @abstractmethod
    def protocol(self) -> dict:
        """Everything besides the weights that shapes the outputs (recorded in the card, hashed into cache keys)."""

    def card(self) -> dict:
        return {"id": self.id, "weights": self.weights_label, "weights_sha256": self.weights_sha256,
                "sample_rate": self.sample_rate, "resampler": RESAMPLER, **self.protocol()}

    @abstractmethod
    def prepare(self, clip: Clip) -> torch.Tensor:
        """One clip -> the network's input for it (resampled, padded)."""

    def batch_key(self, x: torch.Tensor) -> Hashable:
        return tuple(x.shape)

    @abstractmethod
    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Prepared inputs sharing one ``batch_key`` -> per clip {output name: array}."""


def panns_models() -> types.ModuleType:
    """``panns_inference/models.py`` loaded by file path under a private package name.

    Importing the ``panns_inference`` package runs ``wget`` for a label CSV (its config.py);
    the model file itself needs only its sibling ``pytorch_utils`` and torchlibrosa.
    """
    pkg_name = "_siren_panns_inference"
    if f"{pkg_name}.models" in sys.modules:
        return sys.modules[f"{pkg_name}.models"]
    spec = importlib.util.find_spec("panns_inference")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("panns_inference is not installed (pip install panns-inference==0.1.1)")
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules[pkg_name] = pkg
    mspec = importlib.util.spec_from_file_location(f"{pkg_name}.models", Path(pkg.__path__[0]) / "models.py")
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = mod
    mspec.loader.exec_module(mod)
    return mod


class PannsCnn14(Backbone):
    """PANNs Cnn14, 16 kHz protocol: 2048-d embedding (FD) and the 527 pre-sigmoid logits (KL, IS).

    Preprocessing as audioldm_eval's WaveDataset: subtract the clip mean, resample to 16 kHz,
    zero-pad clips shorter than 2 s at the end. The network is panns_inference's own ``Cnn14``
    and its own forward; the logits are the output of its last layer ``fc_audioset``, captured
    by a hook before the sigmoid that forward applies.
    """
    name = "panns_cnn14_16k"
    sample_rate = 16000
    outputs = ("embedding", "logits")
    asset = "panns_cnn14_16k"
    MIN_SAMPLES = 32000  # audioldm_eval pad_short_audio(min_samples=32000)

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(weights, seed, device)
        self._logits: list[torch.Tensor] = []  # filled by the fc_audioset hook during one forward

    def build(self) -> nn.Module:
        net = panns_models().Cnn14(**PANNS_16K)
        net.fc_audioset.register_forward_hook(lambda mod, inp, out: self._logits.append(out))
        return net

    def load_weights(self, net: nn.Module, state: dict) -> None:
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{self.weights_path} is not a PANNs checkpoint (no 'model' key)")
        net.load_state_dict(state["model"])

    def protocol(self) -> dict:
        return {"model": "panns_inference.models.Cnn14 (panns-inference 0.1.1)", **PANNS_16K,
                "embedding": "2048-d 'embedding' output = relu(fc1) (audioldm_eval feature '2048')",
                "logits": "fc_audioset output before the sigmoid (audioldm_eval feature 'logits')",
                "preprocess": "subtract clip mean, resample, zero-pad at the end to >= 2 s",
                "min_samples": self.MIN_SAMPLES, "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        x = torch.from_numpy(clip.wav)
        x = resample(x - x.mean(), clip.sr, self.sample_rate)
        return nn.functional.pad(x, (0, max(0, self.MIN_SAMPLES - x.shape[-1])))

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, N] at 16 kHz -> {"embedding": [B, 2048], "logits": [B, 527]} (float32)."""
        net, self._logits = self.net, []
        out = net(x.to(self.device, torch.float32))
        logits, = self._logits
        return {"embedding": out["embedding"], "logits": logits}

    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        out = {k: v.cpu().numpy() for k, v in self.forward(torch.stack(xs)).items()}
        return [{k: v[i] for k, v in out.items()} for i in range(len(xs))]


class VGGish(Backbone):
    """VGGish for FAD: torchvggish 0.2's network, 128-d per 0.96 s example, no PCA, no final ReLU.

    Exactly what frechet_audio_distance / audioldm_eval use with ``use_pca=False,
    use_activation=False``. Input: resample to 16 kHz, then torchvggish's
    ``vggish_input.waveform_to_examples`` (log-mel, 25 ms window, 10 ms hop, 64 bands 125-7500 Hz,
    non-overlapping 96-frame examples). Clips shorter than one example are zero-padded to one.
    """
    name = "vggish"
    sample_rate = 16000
    outputs = ("frames",)
    asset = "vggish"
    MIN_SAMPLES = 15600  # 400-sample window + 95 hops of 160: the shortest input giving one 96-frame example

    def build(self) -> nn.Module:
        from torchvggish import torchvggish as tv

        net = tv.VGG(tv.make_layers(), postprocess=False)
        # use_activation=False: drop the ReLU after the 128-d layer, as frechet_audio_distance does
        # (the parameter names embeddings.0/2/4 of the pretrained file are unchanged).
        net.embeddings = nn.Sequential(*list(net.embeddings.children())[:-1])
        return net

    def protocol(self) -> dict:
        from torchvggish import vggish_params as p

        return {"model": "torchvggish.torchvggish.VGG (torchvggish 0.2)", "pca": False, "final_relu": False,
                "embedding_dim": 128, "example_seconds": p.EXAMPLE_WINDOW_SECONDS, "example_hop_seconds": p.EXAMPLE_HOP_SECONDS,
                "stft_window_seconds": p.STFT_WINDOW_LENGTH_SECONDS, "stft_hop_seconds": p.STFT_HOP_LENGTH_SECONDS,
                "mel_bands": p.NUM_MEL_BINS, "mel_fmin": p.MEL_MIN_HZ, "mel_fmax": p.MEL_MAX_HZ, "log_offset": p.LOG_OFFSET,
                "preprocess": "resample, torchvggish.vggish_input.waveform_to_examples; zero-pad to one example",
                "min_samples": self.MIN_SAMPLES, "pooling": "all frames of all clips of a set", "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        from torchvggish import vggish_input

        x = resample(torch.from_numpy(clip.wav), clip.sr, self.sample_rate).numpy()
        x = np.pad(x, (0, max(0, self.MIN_SAMPLES - x.shape[0])))
        ex = vggish_input.waveform_to_examples(x.astype(np.float64), self.sample_rate, return_tensor=False)
        return torch.from_numpy(ex).float()[:, None]  # [n_examples, 1, 96, 64]

    def batch_key(self, x: torch.Tensor) -> Hashable:
        return "examples"  # clips batch by concatenating their examples

    @torch.inference_mode()
    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """examples [n, 1, 96, 64] -> [n, 128]."""
        return self.net(examples.to(self.device))

    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        frames = self.forward(torch.cat(xs)).cpu().numpy()
        splits = np.cumsum([x.shape[0] for x in xs])[:-1]
        return [{"frames": f} for f in np.split(frames, splits)]


class ClapAudio(Backbone):
    """LAION-CLAP (``siren.clap.Clap``) audio and text embeddings, both L2-normalised, for the CLAP score.

    Clips are resampled to 16 kHz (the interface of ``Clap.embed_audio``), which does its own
    resampling to the model's rate; clips are cropped at load (``max_seconds``) so laion-clap's
    random crop of clips over 10 s never applies.
    """
    name = "clap"
    sample_rate = 16000
    outputs = ("audio",)

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        from siren.clap import Clap, ClapConfig

        self.clap = Clap(ClapConfig(weights=weights, seed=seed))
        self.device = torch.device(device)
        if hasattr(self.clap, "to"):
            self.clap.to(self.device)
        self.weights_label, self.weights_sha256 = self.clap.weights_label, self.clap.weights_sha256

    @property
    def id(self) -> str:
        return f"{self.name}-{self.clap.id}"

    def protocol(self) -> dict:
        return {"model": f"siren.clap.Clap ({self.clap.id})", "input_sample_rate": 16000,
                "embedding_dim": 512, "normalised": True, "dtype": "float32",
                "preprocess": "resample to 16 kHz; siren.clap.Clap.embed_audio does the rest"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        return resample(torch.from_numpy(clip.wav), clip.sr, self.sample_rate)

    @torch.inference_mode()
    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        out = self.clap.embed_audio(torch.stack(xs).to(self.device)).float().cpu().numpy()
        return [{"audio": o} for o in out]

    @torch.inference_mode()
    def embed_text(self, captions: list[str]) -> np.ndarray:
        return self.clap.embed_text(list(captions)).float().cpu().numpy()

