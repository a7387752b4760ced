"""ImageBind-Huge as the stage-2 reward (Eq. 8 with the paper's phi): cosine of its audio and text embeddings.

The model classes and the text tokenizer are the ``imagebind`` package's own, from the PyPI
distribution ``imagebind-unofficial`` (``pip install -e ".[imagebind]"``): Meta's ``imagebind/``
source with its BPE vocabulary inside the wheel, so tokenising needs no download. Its
``imagebind/__init__.py`` imports ``imagebind/data.py``, which needs ``pkg_resources`` (gone from
setuptools >= 81) and ``pytorchvideo.transforms`` (needs ``torchvision.transforms.functional_tensor``,
gone since torchvision 0.17); neither is importable beside the pinned torch 2.13 stack, and the model
classes need neither. So ``imagebind`` is registered as a bare package (its folder, its
``__init__`` not run) and only ``imagebind.models`` is imported. The audio preprocessing of
``data.py`` (which reads files) is done here on the decoded waveform tensor with the same
constants; tests/test_reward.py checks it against ``data.py``'s own functions.

Weights: ``pretrained`` is ``$SIREN_CACHE/imagebind_huge.pth`` (``python -m siren.assets prefetch
imagebind``), or a path; ``random`` builds the real architecture with seeded random init, for
smoke tests only (labelled ``random`` everywhere). Only the text and audio branches are built
(440M of the 1.2B parameters); the file's other tensors are not loaded.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from siren import assets
from siren.codec import SAMPLE_RATE
from siren.errors import AudioError
from siren.io import load_hashed, load_torch_mmap

INSTALL = ('pip install -e ".[imagebind]"  (the PyPI package imagebind-unofficial; Linux only: its decord has no '
           'macOS arm64 package)')
BPE = Path("bpe") / "bpe_simple_vocab_16e6.txt.gz"
# imagebind/data.py load_and_transform_audio_data: 3 clips of 2 s, 128-bin kaldi fbank, 204 frames,
# normalised with the AudioSet statistics ImageBind was trained with.
CLIP_SECONDS, CLIPS, MEL_BINS, TARGET_FRAMES, MEAN, STD = 2, 3, 128, 204, -4.268, 9.138
FRAME_MS, SHIFT_MS = 25, 10
UNUSED = ("vision", "depth", "thermal", "imu")  # ModalityType values the reward does not use (it uses text, audio)


def package_dir() -> Path:
    """The installed ``imagebind`` folder (found without importing it)."""
    loaded = sys.modules.get("imagebind")
    spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec("imagebind")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / "models" / "imagebind_model.py").is_file():
        raise ImportError(f"reward=imagebind needs the ImageBind model code; install it with `{INSTALL}`, "
                          f"or use reward=clap")
    return Path(locations[0])


def models() -> types.ModuleType:
    """``imagebind.models.imagebind_model``, importing no more of the package than the models (see above)."""
    root = package_dir()
    if "imagebind" not in sys.modules:
        pkg = types.ModuleType("imagebind")
        pkg.__path__ = [str(root)]
        pkg.__spec__ = importlib.util.spec_from_file_location("imagebind", root / "__init__.py",
                                                              submodule_search_locations=[str(root)])
        sys.modules["imagebind"] = pkg
    from imagebind.models import imagebind_model

    return imagebind_model


def tokenizer():
    """ImageBind's own CLIP BPE tokenizer, with the vocabulary shipped inside the package (77 tokens)."""
    models()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(package_dir() / BPE))


def clip_bounds(n_samples: int, sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample ranges of the 3 windows of 2 s: starts k * max(D - 2 s, 0) / 3 for k = 0, 1, 2, as pytorchvideo's
    ConstantClipsPerVideoSampler places them (so the last window ends 1/3 of the slack before the end).
    Exact fractions, truncated to samples, as data.py does."""
    step = Fraction(max(n_samples / sample_rate - CLIP_SECONDS, 0)) / CLIPS
    return [(int(step * k * sample_rate), int((step * k + CLIP_SECONDS) * sample_rate)) for k in range(CLIPS)]


def fbank(segment: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """One window [n], its mean already removed (``audio_inputs``) -> [1, 128, 204]: kaldi fbank (htk, hanning,
    no dither), padded or cut to 204 frames, then (x - mean) / std."""
    import torchaudio

    if segment.numel() < sample_rate * FRAME_MS // 1000:
        raise AudioError(f"ImageBind's fbank needs at least {FRAME_MS} ms of audio, got {segment.numel()} samples; "
                         f"use longer rollouts (rl.seconds)")
    feats = torchaudio.compliance.kaldi.fbank(
        segment[None], htk_compat=True, sample_frequency=sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=MEL_BINS, dither=0.0, frame_length=FRAME_MS, frame_shift=SHIFT_MS).T
    feats = F.pad(feats, (0, max(0, TARGET_FRAMES - feats.shape[1])))[:, :TARGET_FRAMES]
    return ((feats - MEAN) / STD)[None]


def audio_inputs(audio: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Waveforms [B, N] (16 kHz) -> ImageBind's audio input [B, 3, 1, 128, 204], in float32."""
    out = []
    for wav in audio.float():
        # data.py removes each window's mean in place, on a view of the one waveform: where the windows overlap
        # (audio under 6 s, as rollouts are) a later window starts from samples an earlier one centred. Kept, so
        # the inputs are ImageBind's own to the bit (tests/test_reward.py runs its data.py)
        wav, windows = wav.clone(), []
        for a, b in clip_bounds(wav.numel(), sample_rate):
            segment = wav[a:b]
            segment -= segment.mean()
            windows.append(fbank(segment, sample_rate))
        out.append(torch.stack(windows))
    return torch.stack(out)


def huge_kwargs() -> dict:
    """The arguments ``imagebind_huge`` gives ``ImageBindModel``, read from the package's own source (so the
    text and audio branches built here are Meta's ImageBind-Huge ones, not numbers copied into this file)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(models().imagebind_huge))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "ImageBindModel")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def reward_part(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of an ImageBind state dict the reward's model has: all but the unused modalities'
    (keys are ``modality_<preprocessors|trunks|heads|postprocessors>.<modality>.<...>``)."""
    return {k: v for k, v in state.items() if (k.split(".") + [""])[1] not in UNUSED}


def build(state: dict[str, Tensor] | None, seed: int = 0) -> torch.nn.Module:
    """ImageBind-Huge (the package's ``ImageBindModel`` with ``imagebind_huge``'s arguments), text and audio
    branches only. The unused modalities' trunks are built with no blocks and then dropped: building the
    whole model first (the 630M-parameter vision trunk among them) took ~15 s and ~5 GB on 2 CPU cores, and
    it cannot be built on the meta device (its constructor calls ``.item()``). ``state`` (imagebind_huge.pth's),
    when given, is then loaded strictly: every tensor of the two branches must be in it, with its shape."""
    ib = models()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # built on the CPU; the GPUs' generators stay the caller's
        model = ib.ImageBindModel(**{**huge_kwargs(), **{f"{m}_num_blocks": 0 for m in UNUSED}})
    for part in (model.modality_preprocessors, model.modality_trunks, model.modality_heads,
                 model.modality_postprocessors):
        for name in UNUSED:
            del part[name]
    if state is not None:
        model.load_state_dict(reward_part(state), strict=True)
    return model.eval().requires_grad_(False)


class ImageBindReward:
    """R = cosine(ImageBind audio(waveform), ImageBind text(caption)), per rollout (Eq. 8)."""
    needs_audio = True
    name = "imagebind"

    def __init__(self, weights: str = "pretrained", seed: int = 0, device: str | torch.device = "cpu"):
        package_dir()  # fail on a missing package before looking for weights
        if weights == "random":
            state, self.weights_sha256, self.weights_label = None, f"random-seed{seed}", "random"
        else:
            path = assets.require("imagebind") if weights == "pretrained" else Path(weights)
            if not path.is_file():
                raise assets.MissingWeightsError(
                    f"ImageBind-Huge weights {path} do not exist (reward.weights= takes pretrained, random or the "
                    f"path of imagebind_huge.pth; `{assets.PREFETCH} imagebind` fetches the default)")
            # mmap: the unused vision trunk's 2.5 GB of the 4.5 GB file are hashed but never held in memory
            state, self.weights_sha256 = load_hashed(path, load_torch_mmap)
            self.weights_label = assets.label("imagebind", path, self.weights_sha256)
        self.device = torch.device(device)
        self.model = build(state, seed).to(self.device)
        self.tokenizer = tokenizer()
        self.id = f"imagebind-huge-{self.weights_sha256[:16]}"

    @torch.no_grad()
    def __call__(self, audio: Tensor, captions: list[str]) -> Tensor:
        tokens = self.tokenizer(list(captions)).view(len(captions), -1).to(self.device)
        emb = self.model({"text": tokens, "audio": audio_inputs(audio.to(self.device))})
        return F.cosine_similarity(emb["audio"].float(), emb["text"].float(), dim=-1)
