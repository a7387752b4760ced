"""Reward models for stage 2 (Eq. 8): R = cosine(phi_audio(D(codes)), phi_text(c)).

Every reward is called as ``reward(x, captions) -> Tensor[B]``; ``needs_audio`` says whether
x is the decoded 16 kHz waveform [B, N] or the codes [B, 12, T] themselves.

- ``clap``: LAION-CLAP (siren.clap), the default here.
- ``imagebind``: ImageBind-Huge, the paper's choice; needs the ``imagebind`` package and its
  checkpoint, and says how to get them when either is missing.
- ``code_match``: a synthetic reward on codes for tests only (fraction of one layer's codes
  equal to a target value), so learning can be checked without audio.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from siren import assets
from siren.config import check_numbers
from siren.errors import ConfigError
from siren.codec import SAMPLE_RATE
from siren.io import sha256_file

IMAGEBIND_FILE = "imagebind_huge.pth"
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
IMAGEBIND_INSTALL = "pip install git+https://github.com/facebookresearch/ImageBind (needs pytorchvideo)"


@dataclass
class RewardConfig:
    name: str = "clap"  # clap | imagebind | code_match (tests only)
    weights: str = "pretrained"  # clap: pretrained | random; imagebind: pretrained | /path/imagebind_huge.pth
    seed: int = 0  # random-init seed for weights=random
    code_layer: int = 0  # code_match: which RVQ layer (0-based) ...
    code_value: int = 0  # ... must lie in [code_value, code_value + code_width)
    code_width: int = 1

    def __post_init__(self):
        if self.name not in ("clap", "imagebind", "code_match"):
            raise ConfigError(f"reward.name must be clap, imagebind or code_match, got {self.name!r}")
        check_numbers(self, "reward.", positive=("code_width",), nonneg=("seed", "code_layer", "code_value"))


class ClapReward:
    """Cosine of LAION-CLAP's audio and text embeddings (``Clap.score``). Pass ``clap`` to share
    the model that already encodes the text conditioning (same weights, one copy in memory)."""
    needs_audio = True

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu",
                 clap=None):
        from siren.clap import Clap, ClapConfig

        self.clap = clap if clap is not None else Clap(ClapConfig(weights=weights, seed=seed)).to(device)
        self.weights_label = self.clap.weights_label
        self.id = f"clap-{self.clap.id}"

    @torch.no_grad()
    def __call__(self, audio: Tensor, captions: list[str]) -> Tensor:
        return self.clap.score(audio, list(captions)).float()


class ImageBindReward:
    """ImageBind-Huge text/audio cosine, with the package's own audio preprocessing
    (3 clips of 2 s, 128-bin kaldi fbank, 204 frames, mean -4.268 / std 9.138) applied to
    the waveform tensor instead of a file."""
    needs_audio = True

    def __init__(self, weights: str = "pretrained", device: str | torch.device = "cpu"):
        try:
            from imagebind.models import imagebind_model
        except ImportError as e:
            raise ImportError(f"reward=imagebind needs the ImageBind package ({e}). Install it with "
                              f"`{IMAGEBIND_INSTALL}`, or use reward=clap.") from None
        path = assets.cache_dir() / IMAGEBIND_FILE if weights == "pretrained" else Path(weights)
        if not path.is_file() or path.stat().st_size == 0:
            raise assets.MissingWeightsError(
                f"ImageBind-Huge weights not found at {path}. On a machine with internet download "
                f"{IMAGEBIND_URL} to {assets.cache_dir() / IMAGEBIND_FILE} (or pass reward.weights=/path/to/"
                f"{IMAGEBIND_FILE}). Random ImageBind weights are not offered: use reward=clap reward.weights=random "
                f"for a smoke test.")
        self.model = imagebind_model.imagebind_huge(pretrained=False)
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.weights_label = "pretrained"
        self.id = f"imagebind-huge-{sha256_file(path)[:16]}"

    def _audio_inputs(self, audio: Tensor) -> Tensor:
        from imagebind.data import get_clip_timepoints, waveform2melspec
        from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler

        sampler = ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=3)
        out = []
        for wav in audio.float().cpu():
            clips = []
            for start, end in get_clip_timepoints(sampler, wav.numel() / SAMPLE_RATE):
                seg = wav[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)][None].clone()
                clips.append((waveform2melspec(seg, SAMPLE_RATE, 128, 204) - (-4.268)) / 9.138)
            out.append(torch.stack(clips))
        return torch.stack(out).to(self.device)

    @torch.no_grad()
    def __call__(self, audio: Tensor, captions: list[str]) -> Tensor:
        from imagebind.data import load_and_transform_text
        from imagebind.models.imagebind_model import ModalityType

        emb = self.model({ModalityType.TEXT: load_and_transform_text(list(captions), self.device),
                          ModalityType.AUDIO: self._audio_inputs(audio)})
        return torch.nn.functional.cosine_similarity(emb[ModalityType.AUDIO], emb[ModalityType.TEXT], dim=-1)


class CodeMatchReward:
    """Tests only: the fraction of frames whose layer-``layer`` code lies in [value, value + width)
    (width 1: equals ``value``; a wider target gives an untrained policy some reward to start from)."""
    needs_audio = False
    weights_label = "synthetic"

    def __init__(self, layer: int = 0, value: int = 0, width: int = 1):
        self.layer, self.value, self.width = layer, value, width
        self.id = f"code-match-l{layer}-v{value}-w{width}"

    def __call__(self, codes: Tensor, captions: list[str]) -> Tensor:
        c = codes[:, self.layer]
        return ((c >= self.value) & (c < self.value + self.width)).float().mean(dim=-1)


def build_reward(cfg: RewardConfig, device: str | torch.device = "cpu", clap=None):
    """The reward named by ``cfg``; ``clap``: an already built ``siren.clap.Clap`` to reuse when
    its weights are the ones asked for."""
    if cfg.name == "clap":
        same = clap is not None and (clap.cfg.weights, clap.cfg.seed) == (cfg.weights, cfg.seed)
        return ClapReward(cfg.weights, cfg.seed, device, clap if same else None)
    if cfg.name == "imagebind":
        return ImageBindReward(cfg.weights, device)
    if cfg.name == "code_match":
        return CodeMatchReward(cfg.code_layer, cfg.code_value, cfg.code_width)
    raise ValueError(f"unknown reward.name '{cfg.name}'; valid: clap, imagebind, code_match")
