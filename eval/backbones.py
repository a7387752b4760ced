"""Metric backbones behind one interface: PANNs Cnn14 (FD, KL, IS), VGGish (FAD), LAION-CLAP (CLAP score).

Each backbone takes clips at their own sample rate and resamples them with
``torchaudio.functional.resample`` (settings in ``RESAMPLER``) to the rate its network was
trained at. ``prepare`` turns one clip into the network's input, ``embed_batch`` runs a batch of
prepared inputs that share ``batch_key`` (equal shapes, so batching never pads: a batched result
equals the one-clip result). ``protocol()`` lists everything that shapes the numbers; it goes into
the protocol card and into the embedding cache key with ``id`` (name + weight hash).

Weights: ``pretrained`` loads the file from the assets cache (``siren.assets.require``) with
``torch.load(weights_only=True)``; ``demo`` loads the project's own weights trained on the embedded
demo set (``siren.demo_assets``: a seeded random trunk, checked by hash, with the trained tensors
in the pretrained file's key layout on top); ``random`` (seeded) is the explicit smoke-test mode
and makes ``weights_sha256`` read ``random-seed<k>``.
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
from siren.demo_assets import store
from siren.errors import ConfigError

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
        elif weights == "demo":
            self.weights_path = store.demo_file(self.asset)
            store.header(self.weights_path)  # a missing or foreign file fails here, not at first use
            self.weights_sha256 = assets.sha256(self.weights_path)
        else:
            raise ConfigError(f"weights must be 'pretrained', 'demo' or 'random', got {weights!r}")
        self.weights_label, self.seed, self.device = weights, seed, torch.device(device)

    @cached_property
    def net(self) -> nn.Module:
        return self.build().eval().requires_grad_(False).to(self.device)

    @abstractmethod
    def build(self) -> nn.Module:
        """The network with its weights: seeded random init, or the pretrained file loaded."""

    def _init_or_load(self, make, state_of=lambda ckpt: ckpt) -> nn.Module:
        if self.weights_path is None:
            return _seeded(self.seed, make)
        if self.weights_label == "demo":
            return store.load(self.weights_path, make)
        net = make()
        net.load_state_dict(state_of(_load_state(self.weights_path)))
        return net

    @property
    def id(self) -> str:
        return f"{self.name}-{self.weights_sha256[:16]}"

    @abstractmethod
    def protocol(self) -> dict:
        """Everything besides the weights that shapes the outputs (recorded in the card, hashed into cache keys)."""

    def card(self) -> dict:
        note = {"weights_note": store.LABEL} if self.weights_label == "demo" else {}
        return {"id": self.id, "weights": self.weights_label, **note, "weights_sha256": self.weights_sha256,
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
        def state_of(ckpt):
            if not isinstance(ckpt, dict) or "model" not in ckpt:
                raise ValueError(f"{self.weights_path} is not a PANNs checkpoint (no 'model' key)")
            return ckpt["model"]

        net = self._init_or_load(lambda: panns_models().Cnn14(**PANNS_16K), state_of)
        net.fc_audioset.register_forward_hook(lambda mod, inp, out: self._logits.append(out))
        return net

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

        net = self._init_or_load(lambda: tv.VGG(tv.make_layers(), postprocess=False))
        # use_activation=False: drop the ReLU after the 128-d layer, as frechet_audio_distance does.
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
    """LAION-CLAP audio and text embeddings (``siren.clap.Clap``), both L2-normalised, for the CLAP score.

    Clips are resampled once, from their own rate to CLAP's 48 kHz, with the same torchaudio
    resampler as the other backbones; ``Clap.embed_audio`` then does what laion-clap does
    (16-bit quantisation, repeat-padding) except that it keeps the FIRST 10 s instead of a random
    10 s window (clips are cropped at load anyway, ``max_seconds``).
    """
    name = "clap"
    sample_rate = 48000
    outputs = ("audio",)
    asset = "clap"

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(weights, seed, device)
        # pretrained text branch: RoBERTa's BPE files (random and demo weights use laion_clap's bundled CLIP BPE)
        self.tokenizer_files = ([] if weights != "pretrained" else
                                [assets.require("roberta_vocab"), assets.require("roberta_merges")])

    def build(self) -> nn.Module:
        from siren.clap import Clap, ClapConfig

        clap = Clap(ClapConfig(weights=self.weights_label, seed=self.seed))
        if clap.weights_sha256 != self.weights_sha256:
            raise RuntimeError(f"CLAP loaded weights {clap.weights_sha256}, expected {self.weights_sha256}")
        return clap

    def protocol(self) -> dict:
        from siren import clap as C

        tokenizer = ("RoBERTa BPE, sha256 " + ", ".join(f"{p.name} {assets.sha256(p)[:16]}" for p in self.tokenizer_files)
                     if self.tokenizer_files else f"laion_clap's bundled CLIP BPE ({self.weights_label}-weights mode)")
        return {"model": "laion_clap CLAP, HTSAT-tiny audio + RoBERTa text, non-fusion (siren.clap.Clap)",
                "clap_sample_rate": C.CLAP_SAMPLE_RATE, "audio": C.AUDIO_PROTOCOL, "text_tokenizer": tokenizer,
                "max_text_tokens": C.MAX_TEXT_LENGTH, "embedding_dim": C.EMBED_DIM, "normalised": True,
                "preprocess": "resample to 48 kHz, then siren.clap.Clap.embed_audio", "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        return resample(torch.from_numpy(clip.wav), clip.sr, self.sample_rate)

    def batch_key(self, x: torch.Tensor) -> Hashable:
        return "clips"  # embed_audio brings every clip to the same 10 s input itself

    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            out = self.net.embed_audio([x.to(self.device) for x in xs], sample_rate=self.sample_rate)
        return [{"audio": o} for o in out.float().cpu().numpy()]

    def embed_text(self, captions: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.net.embed_text(list(captions)).float().cpu().numpy()
