"""Metric backbones behind one interface: PANNs Cnn14 (FD, KL, IS), VGGish (FAD), LAION-CLAP (CLAP score).

Each backbone takes clips at their own sample rate, makes them mono (``channel``: first or mean) and resamples
them (``resampler``, one of eval.audio's ``RESAMPLERS``) to the rate its network was trained at. The defaults
are each metric's reference code: PANNs as audioldm_eval (first channel, torchaudio), VGGish as
audioldm_eval's and frechet_audio_distance's FAD (mean, resampy), CLAP as laion_clap's
``get_audio_embedding_from_filelist`` (mean, librosa via ``librosa.load``). ``prepare`` turns one clip into
the network's input, ``embed_batch`` runs a batch of prepared inputs that share ``batch_key``, so batching
never pads one clip to another's length (a batched result equals the one-clip result): PANNs batches equal
shapes, VGGish concatenates the clips' 0.96 s examples, CLAP brings every clip to its 10 s input itself.
``protocol()`` lists everything that shapes the numbers; it goes into the protocol card and into the embedding
cache key with ``id`` (name + weight hash).

Weights: ``pretrained`` loads the file from the assets cache (``siren.assets.require``) with
``torch.load(weights_only=True)``; ``demo`` loads the project's own weights trained on the embedded
demo set (``siren.demo_assets``: a seeded random trunk, checked by hash, with the trained tensors
in the pretrained file's key layout on top); ``random`` (seeded) is the explicit smoke-test mode
and makes ``weights_sha256`` read ``random-seed<k>``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import types
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Hashable

import numpy as np
import torch
from torch import nn

from eval.audio import CHANNELS, RESAMPLER_LIBRARIES, RESAMPLERS, BadAudioError, Clip, mono, resample
from siren import assets, demo_weights
from siren.errors import ConfigError, WeightsMismatchError
from siren.io import load_hashed, load_torch_file, same_file, sha256_file, weights_tag

log = logging.getLogger(__name__)

# The 16 kHz Cnn14 (Cnn14_16k_mAP=0.438.pth), as audioldm_eval builds it for sampling_rate=16000.
PANNS_16K = dict(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50, fmax=8000,
                 classes_num=527)


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
    libraries: tuple[str, ...]  # the distributions whose code the network runs (besides torch and numpy)
    channel: str  # default: the reference code's (class attribute), overridable per instance
    resampler: str

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 channel: str | None = None, resampler: str | None = None):
        self.channel, self.resampler = channel or self.channel, resampler or self.resampler
        if self.channel not in CHANNELS or self.resampler not in RESAMPLERS:
            raise ValueError(f"{self.name}: channel must be one of {CHANNELS} and resampler one of "
                             f"{tuple(RESAMPLERS)}, got {self.channel!r}, {self.resampler!r}")
        if weights == "random":
            self.weights_path, self.weights_sha256 = None, f"random-seed{seed}"
        elif weights == "pretrained":
            self.weights_path = assets.require(self.asset)
            self.weights_sha256 = sha256_file(self.weights_path)
        elif weights == "demo":
            self.weights_path = demo_weights.demo_file(self.asset)
            demo_weights.header(self.weights_path)  # a missing or foreign file fails here, not at first use
            self.weights_sha256 = sha256_file(self.weights_path)
        else:
            raise ConfigError(f"weights must be 'pretrained', 'demo' or 'random', got {weights!r}")
        # a file in the cache that is not the publisher's (its digest) is labelled by its path, not "pretrained"
        self.weights = weights
        self.weights_label = (assets.label(self.asset, self.weights_path, self.weights_sha256)
                              if weights == "pretrained" else weights)
        self.seed, self.device = seed, torch.device(device)

    @cached_property
    def net(self) -> nn.Module:
        return self.build().eval().requires_grad_(False).to(self.device)

    @abstractmethod
    def build(self) -> nn.Module:
        """The network with its weights: seeded random init, or the pretrained file loaded."""

    def _init_or_load(self, make, state_of=lambda ckpt: ckpt) -> nn.Module:
        if self.weights_path is None:  # ``make`` builds the same network for every instance of a class
            return demo_weights.seeded(self.seed, make, key=(type(self).__name__,))
        # the file hashed into this backbone's id at __init__ must be the one loaded now (siren.io.load_hashed)
        if self.weights == "demo":
            return demo_weights.load(self.weights_path, make, self.weights_sha256)[0]
        ckpt, _ = load_hashed(self.weights_path, load_torch_file, self.weights_sha256)
        state, net = state_of(ckpt), make()
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # missing or unexpected keys, other shapes: another network's file
            raise WeightsMismatchError(f"{self.weights_path} does not fit {type(self).__name__} "
                                       f"({str(e).splitlines()[0]}); `{assets.PREFETCH} {self.asset}` fetches the "
                                       f"published file") from None
        return net

    @property
    def id(self) -> str:
        return f"{self.name}-{weights_tag(self.weights_sha256)}"

    def protocol(self) -> dict:
        """Everything besides the weights that shapes the outputs (recorded in the card, hashed into cache keys):
        with the versions of the libraries that compute them and the device type, so an upgrade or a GPU job
        computes embeddings afresh rather than mixing in entries computed otherwise."""
        return {"channel": self.channel, "resampler": RESAMPLERS[self.resampler], **self.model_protocol(),
                **self.runtime(RESAMPLER_LIBRARIES[self.resampler])}

    def runtime(self, extra: tuple[str, ...] = ()) -> dict:
        """The versions of the libraries the network runs on (with ``extra``'s) and the device type."""
        libraries = ("torch", "numpy", *extra, *self.libraries)
        return {"versions": {d: importlib.metadata.version(d) for d in libraries},
                # cuDNN convolutions run in TF32 by default: a GPU's embeddings are not a CPU's to the last bits
                "device_type": self.device.type}

    @abstractmethod
    def model_protocol(self) -> dict:
        """The network's and the preprocessing's settings."""

    def card(self) -> dict:
        note = {"weights_note": demo_weights.LABEL} if self.weights == "demo" else {}
        return {"id": self.id, "weights": self.weights_label, **note, "weights_sha256": self.weights_sha256,
                "sample_rate": self.sample_rate, **self.protocol()}

    def mono_at_rate(self, clip: Clip) -> np.ndarray:
        """The clip as this backbone's reference code reads it: mono by ``channel``, at ``sample_rate``."""
        return resample(mono(clip.wav, self.channel), clip.sr, self.sample_rate, self.resampler)

    @abstractmethod
    def prepare(self, clip: Clip) -> torch.Tensor:
        """One clip -> the network's input for it (resampled, padded)."""

    def batch_key(self, x: torch.Tensor) -> Hashable:
        """Prepared inputs with the same key run in one batch: by default those of one shape."""
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
    libraries = ("panns-inference",)
    sample_rate = 16000
    outputs = ("embedding", "logits")
    asset = "panns_cnn14_16k"
    channel, resampler = "first", "torchaudio"  # audioldm_eval's WaveDataset.read_from_file
    MIN_SAMPLES = 32000  # audioldm_eval pad_short_audio(min_samples=32000)

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 channel: str | None = None, resampler: str | None = None):
        super().__init__(weights, seed, device, channel, resampler)
        self._logits: list[torch.Tensor] = []  # filled by the fc_audioset hook during one forward

    def build(self) -> nn.Module:
        def state_of(ckpt):
            if not isinstance(ckpt, dict) or "model" not in ckpt:
                raise WeightsMismatchError(f"{self.weights_path} is not a PANNs checkpoint (no 'model' key)")
            return ckpt["model"]

        net = self._init_or_load(lambda: panns_models().Cnn14(**PANNS_16K), state_of)
        net.fc_audioset.register_forward_hook(lambda mod, inp, out: self._logits.append(out))
        return net

    def model_protocol(self) -> dict:
        return {"model": "panns_inference.models.Cnn14 (panns-inference 0.1.1)", **PANNS_16K,
                "embedding": "2048-d 'embedding' output = relu(fc1) (audioldm_eval feature '2048')",
                "logits": "fc_audioset output before the sigmoid (audioldm_eval feature 'logits')",
                "preprocess": "subtract clip mean, resample, zero-pad at the end to >= 2 s",
                "min_samples": self.MIN_SAMPLES, "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        x = torch.from_numpy(mono(clip.wav, self.channel))
        x = x - x.mean()  # in torch float32, as audioldm_eval: bit-identical inputs
        x = torch.from_numpy(resample(x.numpy(), clip.sr, self.sample_rate, self.resampler))
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
    use_activation=False``. Input: mono, resample to 16 kHz, then torchvggish's
    ``vggish_input.waveform_to_examples`` (log-mel, 25 ms window, 10 ms hop, 64 bands 125-7500 Hz,
    non-overlapping 96-frame examples; a partial last example is dropped).

    A clip shorter than one example (0.975 s) has none. ``short`` says what then happens:
    ``skip`` (default): it adds no frames to the set, as in audioldm_eval's FAD, whose per-file
    loop catches the error VGGish raises on zero examples (frechet_audio_distance 0.3.4 instead
    stops reading the set at that file, silently); ``pad``: zero-padded to one example (this
    harness's earlier behaviour); ``error``: refused.
    """
    name = "vggish"
    libraries = ("torchvggish",)
    sample_rate = 16000
    outputs = ("frames",)
    asset = "vggish"
    channel, resampler = "mean", "resampy"  # audioldm_eval / frechet_audio_distance load_audio_task
    MIN_SAMPLES = 15600  # 400-sample window + 95 hops of 160: the shortest input giving one 96-frame example
    SHORT = ("skip", "pad", "error")

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 channel: str | None = None, resampler: str | None = None, short: str = "skip"):
        if short not in self.SHORT:
            raise ValueError(f"vggish short must be one of {', '.join(self.SHORT)}, got {short!r}")
        self.short = short
        super().__init__(weights, seed, device, channel, resampler)

    def build(self) -> nn.Module:
        from torchvggish import torchvggish as tv

        net = self._init_or_load(lambda: tv.VGG(tv.make_layers(), postprocess=False))
        # use_activation=False: drop the ReLU after the 128-d layer, as frechet_audio_distance does.
        net.embeddings = nn.Sequential(*list(net.embeddings.children())[:-1])
        return net

    def model_protocol(self) -> dict:
        from torchvggish import vggish_params as p

        return {"model": "torchvggish.torchvggish.VGG (torchvggish 0.2)", "pca": False, "final_relu": False,
                "embedding_dim": 128, "example_seconds": p.EXAMPLE_WINDOW_SECONDS,
                "example_hop_seconds": p.EXAMPLE_HOP_SECONDS,
                "stft_window_seconds": p.STFT_WINDOW_LENGTH_SECONDS, "stft_hop_seconds": p.STFT_HOP_LENGTH_SECONDS,
                "mel_bands": p.NUM_MEL_BINS, "mel_fmin": p.MEL_MIN_HZ, "mel_fmax": p.MEL_MAX_HZ,
                "log_offset": p.LOG_OFFSET,
                "preprocess": "mono, resample, torchvggish.vggish_input.waveform_to_examples",
                "min_samples": self.MIN_SAMPLES, "short": self.short, "short_rule": {
                    "skip": "clips under min_samples add no frames (audioldm_eval)",
                    "pad": "clips under min_samples are zero-padded to one example",
                    "error": "clips under min_samples are refused"}[self.short],
                "pooling": "all frames of all clips of a set", "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        from torchvggish import vggish_input

        x = self.mono_at_rate(clip)
        if x.shape[0] < self.MIN_SAMPLES:
            seconds = f"{x.shape[0] / self.sample_rate:.3f} s"
            if self.short == "error":
                raise BadAudioError(f"{clip.path or clip.id}: {seconds} is shorter than one VGGish example (0.975 s); "
                                 "pass vggish_short=skip (as audioldm_eval) or vggish_short=pad")
            if self.short == "skip":
                log.warning("%s: %s is shorter than one VGGish example (0.975 s): it adds no frames to FAD "
                            "(vggish_short=skip, as audioldm_eval)", clip.path or clip.id, seconds)
                return torch.zeros(0, 1, 96, 64)
            x = np.pad(x, (0, self.MIN_SAMPLES - x.shape[0]))
        ex = vggish_input.waveform_to_examples(x.astype(np.float64), self.sample_rate, return_tensor=False)
        return torch.from_numpy(ex).float()[:, None]  # [n_examples, 1, 96, 64]

    def batch_key(self, x: torch.Tensor) -> Hashable:
        return "examples"  # clips batch by concatenating their examples

    @torch.inference_mode()
    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """examples [n, 1, 96, 64] -> [n, 128]."""
        return self.net(examples.to(self.device))

    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        examples = torch.cat(xs)
        # VGG's flatten cannot take zero examples (all clips skipped): no frames, no forward
        frames = self.forward(examples).cpu().numpy() if len(examples) else np.zeros((0, 128), np.float32)
        splits = np.cumsum([x.shape[0] for x in xs])[:-1]
        return [{"frames": f} for f in np.split(frames, splits)]


class ClapAudio(Backbone):
    """LAION-CLAP audio and text embeddings (``siren.clap.Clap``), both L2-normalised, for the CLAP score.

    Clips are made mono and resampled once, from their own rate to CLAP's 48 kHz, by default as
    laion_clap's ``get_audio_embedding_from_filelist`` reads files (``librosa.load(sr=48000)``:
    mean of channels, soxr_hq); ``Clap.embed_audio`` then does what laion-clap does (16-bit
    quantisation, repeat-padding) except that it keeps the FIRST 10 s of a longer clip where
    laion_clap takes a random 10 s window (not reproducible).
    """
    name = "clap"
    libraries = ("laion-clap", "transformers")
    sample_rate = 48000
    outputs = ("audio",)
    asset = "clap"
    channel, resampler = "mean", "librosa"  # librosa.load(f, sr=48000) in laion_clap

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 channel: str | None = None, resampler: str | None = None):
        super().__init__(weights, seed, device, channel, resampler)
        # pretrained text branch: RoBERTa's BPE files (random and demo weights use laion_clap's bundled CLIP BPE)
        self.tokenizer_files = ([] if self.weights_path is None or weights == "demo" else
                                [assets.require("roberta_vocab"), assets.require("roberta_merges")])

    def build(self) -> nn.Module:
        from siren.clap import Clap, ClapConfig

        clap = Clap(ClapConfig(weights=self.weights, seed=self.seed))
        same_file(self.weights_path or "the seeded CLAP", self.weights_sha256, clap.weights_sha256)
        return clap

    def model_protocol(self) -> dict:
        from siren import clap as C

        tokenizer = ("RoBERTa BPE, sha256 " + ", ".join(f"{p.name} {sha256_file(p)[:16]}" for p in self.tokenizer_files)
                     if self.tokenizer_files else f"laion_clap's bundled CLIP BPE ({self.weights}-weights mode)")
        return {"model": "laion_clap CLAP, HTSAT-tiny audio + RoBERTa text, non-fusion (siren.clap.Clap)",
                "clap_sample_rate": C.CLAP_SAMPLE_RATE, "audio": C.AUDIO_PROTOCOL, "text_tokenizer": tokenizer,
                "max_text_tokens": C.MAX_TEXT_LENGTH, "embedding_dim": C.EMBED_DIM, "normalised": True,
                "preprocess": "mono, resample to 48 kHz, then siren.clap.Clap.embed_audio (first 10 s)",
                "dtype": "float32"}

    def prepare(self, clip: Clip) -> torch.Tensor:
        return torch.from_numpy(self.mono_at_rate(clip))

    def batch_key(self, x: torch.Tensor) -> Hashable:
        return "clips"  # embed_audio brings every clip to the same 10 s input itself

    def embed_batch(self, xs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            # one HTSAT call per batch of eval's batch_size (embed_audio's own default, 16, split larger ones)
            out = self.net.embed_audio([x.to(self.device) for x in xs], sample_rate=self.sample_rate,
                                       batch_size=len(xs))
        return [{"audio": o} for o in out.float().cpu().numpy()]

    def embed_text(self, captions: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.net.embed_text(list(captions)).float().cpu().numpy()
