"""LAION-CLAP (HTSAT-tiny audio branch + RoBERTa text branch, non-fusion): the frozen text
encoder that conditions every model, the CLAP score of the evaluation, and the stage-2 reward.

The network is laion_clap's own ``CLAP`` class, built by laion_clap's own ``create_model`` with
the ``HTSAT-tiny`` config (the architecture of ``630k-audioset-best.pt``). The one line of it that
needs the network, ``RobertaModel.from_pretrained('roberta-base')``, is replaced by a RoBERTa
built from its config; the checkpoint carries the text-branch weights anyway.

Weights:
  ``pretrained``   the checkpoint from the assets cache (``python -m siren.assets prefetch clap``),
                   tokenized with RoBERTa's BPE (assets ``roberta_vocab`` + ``roberta_merges``).
  a file path      any laion-clap checkpoint of the same architecture, same tokenizer.
  ``random``       explicit smoke-test mode: random init from ``seed``, tokenized with the CLIP BPE
                   that ships inside laion_clap (RoBERTa's vocabulary is sized to it). Same code path.
  ``demo``         demo weights (trained on the embedded set): the ``random`` network of the file's
                   seed with projection heads trained on the demo captions (``siren.demo_assets``).

Audio goes in at 16 kHz (the codec's rate), is resampled to CLAP's 48 kHz, quantised to 16 bit as
laion-clap's ``get_audio_embedding_from_data`` does, cut to its FIRST 10 s (laion-clap would crop
a random 10 s window: not reproducible) and repeat-padded as laion-clap does when shorter.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from siren import assets, demo_weights
from siren.errors import CheckpointError, ConfigError, WeightsMismatchError
from siren.io import load_hashed, load_torch_weights, sha256_file, weights_tag

CLAP_SAMPLE_RATE = 48_000
CLIP_SAMPLES = 480_000  # 10 s at 48 kHz: HTSAT-tiny's fixed input length
MAX_TEXT_LENGTH = 77  # laion-clap's tokenizer max_length (specials included)
EMBED_DIM = 512
TEXT_DIM = 768
POSITION_ROWS = 514  # RoBERTa's position embedding rows (roberta-base), the first 2 below its padding offset
RESAMPLER = "torchaudio.functional.resample(sinc_interp_hann, lowpass_filter_width=6, rolloff=0.99)"
AUDIO_PROTOCOL = "16-bit quantised, first 10 s, repeat-pad (laion-clap repeatpad), HTSAT-tiny non-fusion"

# A caption any working BPE splits into ordinary tokens; a tokenizer built without its files does not.
_PROBE = "a dog barks while rain falls on a tin roof"


@contextlib.contextmanager
def numba_cache_dir_kept():
    """NUMBA_CACHE_DIR as it was before the block. laion_clap's clap_module/pann_model.py sets it to /tmp/ for the
    whole process when imported; numba then caches librosa's compiled functions in /tmp/ rather than beside them,
    where a process that had not imported laion_clap looked, and each place compiled them anew (~23 s on 2 cores)."""
    before = os.environ.get("NUMBA_CACHE_DIR")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("NUMBA_CACHE_DIR", None)
        else:
            os.environ["NUMBA_CACHE_DIR"] = before


def _clap_module():
    """laion_clap's model package ``clap_module``, imported as laion_clap's own hook imports it.

    ``laion_clap/__init__.py`` appends its directory to sys.path and imports ``clap_module`` from
    there; we do the same without running its hook, which builds three HF tokenizers at import.
    """
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("laion_clap is not installed (pip install laion-clap==1.1.7)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    if pkg_dir not in sys.path:
        sys.path.append(pkg_dir)
    # clap_module imports timm, whose summary helper imports wandb when it is installed (laion_clap requires
    # it) for a logging option nothing here uses: ~3 s of every eval, prepare and alignment job's start on
    # 2 cores. `import wandb` fails (timm catches it) during this import only.
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None
    try:
        with numba_cache_dir_kept():
            import clap_module  # noqa: E402  (laion_clap's model code)
            import clap_module.model  # noqa: F401
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return clap_module


# ---------------------------------------------------------------------------------------------
# Tokenizers: captions -> token ids (specials included) with one interface for both BPEs.

class BpeTokenizer:
    """A caption tokenizer for the CLAP text branch: ``encode(str) -> ids`` incl. specials."""

    id: str
    vocab_size: int  # rows of the RoBERTa embedding this tokenizer indexes
    pad_id: int
    special_ids: frozenset[int]
    unk_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, captions: Sequence[str], max_length: int = MAX_TEXT_LENGTH
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (input_ids [B, L] int64, attention_mask [B, L] int64), L = longest caption.

        Truncation keeps the end-of-text token, as HF's ``truncation=True`` does for RoBERTa.
        Padding to the longest caption instead of laion-clap's 77 changes nothing but rounding:
        padded positions are masked out of attention and the pooler reads position 0.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of str, got {type(captions).__name__}")
        if len(captions) == 0:
            raise ValueError("no captions to tokenize")
        seqs = []
        for text in captions:
            ids = self.encode(text)
            seqs.append(ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:])
        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return input_ids, mask

    def check(self, source: str, fix: str) -> None:
        """Refuse a degenerate tokenizer (transformers 5 builds one silently from missing files:
        "hello world" -> [2, 3], specials only)."""
        ids = self.encode(_PROBE)
        ordinary = [i for i in ids if i not in self.special_ids and i != self.unk_id]
        if len(ordinary) < len(_PROBE.split()) or max(ids) >= self.vocab_size:
            raise assets.MissingWeightsError(
                f"the CLAP text tokenizer from {source} is degenerate: {_PROBE!r} -> {ids} "
                f"({len(ordinary)} ordinary tokens, vocabulary {self.vocab_size}). Its vocabulary files are "
                f"missing, empty or wrong. {fix}")


class RobertaBpe(BpeTokenizer):
    """RoBERTa's byte-level BPE (roberta-base vocab.json + merges.txt), as laion-clap tokenizes."""

    VOCAB_SIZE = 50265  # roberta-base

    def __init__(self, vocab: Path, merges: Path):
        from transformers import RobertaTokenizer

        fix = (f"Run `{assets.PREFETCH} roberta_vocab roberta_merges` on a machine with internet "
               f"(files expected at {vocab} and {merges}).")
        for p in (vocab, merges):
            if not Path(p).is_file():
                raise assets.MissingWeightsError(f"RoBERTa tokenizer file {p} not found. {fix}")
        # transformers 5: the arguments are `vocab`/`merges`; `vocab_file=` is silently ignored.
        self._tok = RobertaTokenizer(vocab=str(vocab), merges=str(merges))
        if len(self._tok) > self.VOCAB_SIZE:
            raise ValueError(f"{vocab} holds {len(self._tok)} tokens: not roberta-base's vocabulary "
                             f"({self.VOCAB_SIZE}). {fix}")
        self.vocab_size = self.VOCAB_SIZE
        self.pad_id = self._tok.pad_token_id
        self.unk_id = self._tok.unk_token_id
        self.special_ids = frozenset(self._tok.all_special_ids)
        self.id = f"roberta-bpe-{sha256_file(vocab, merges)[:12]}"
        self.check(f"{vocab} + {merges}", fix)

    def encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]  # <s> ... </s>


class ClipBpe(BpeTokenizer):
    """The CLIP BPE bundled in laion_clap (``clap_module.tokenizer``), for weights=random.

    Ids are shifted by one so that 0 is padding: RoBERTa derives position ids from the padding id
    (positions = padding_id + 1 + index), so it must be small, and no CLIP token may equal it.
    """

    def __init__(self, bpe_path: Path | None = None):
        tok_mod = _clap_module().tokenizer
        path = Path(bpe_path or tok_mod.default_bpe())
        if not path.is_file():
            raise assets.MissingWeightsError(f"laion_clap's bundled CLIP BPE file {path} is missing; "
                                             f"reinstall laion-clap==1.1.7")
        self._tok = tok_mod.SimpleTokenizer(str(path))
        self.sot, self.eot = (self._tok.encoder[t] + 1 for t in ("<start_of_text>", "<end_of_text>"))
        self.vocab_size = len(self._tok.encoder) + 1
        self.pad_id, self.unk_id = 0, None
        self.special_ids = frozenset({0, self.sot, self.eot})
        self.id = f"clip-bpe-{sha256_file(path)[:12]}"
        self.check(str(path), "Reinstall laion-clap==1.1.7.")

    def encode(self, text: str) -> list[int]:
        return [self.sot] + [i + 1 for i in self._tok.encode(text)] + [self.eot]


def laion_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """laion-clap checkpoint layout -> CLAP state_dict (as laion_clap.clap_module.factory.load_state_dict):
    ``{"state_dict": {"module.<key>": ...}, "epoch": ...}`` or a bare state_dict; the DDP ``module.``
    prefix goes; ``text_branch.embeddings.position_ids`` goes (a non-persistent buffer in
    transformers >= 4.31)."""
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("no state_dict of tensors in it")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd.pop("text_branch.embeddings.position_ids", None)
    return sd


# ---------------------------------------------------------------------------------------------

@dataclass
class ClapConfig:
    # "pretrained" (assets cache), "demo" (trained on the embedded set), "random" (explicit smoke-test
    # mode) or a .pt path
    weights: str = "pretrained"
    seed: int = 0  # random-init seed for weights=random (demo weights record their own)


@contextlib.contextmanager
def _roberta_from_config(model_module, config):
    """laion_clap's CLAP.__init__ calls RobertaModel.from_pretrained('roberta-base'), which needs the
    network: for the duration of the build, that call constructs RobertaModel(config) instead."""
    from transformers import RobertaModel

    class _FromConfig:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            assert name == "roberta-base", name
            return RobertaModel(config, add_pooling_layer=True)

    saved = model_module.RobertaModel
    model_module.RobertaModel = _FromConfig
    try:
        yield
    finally:
        model_module.RobertaModel = saved


def build_model(tokenizer: BpeTokenizer) -> nn.Module:
    """laion_clap's CLAP, HTSAT-tiny + RoBERTa (roberta-base hyper-parameters), fp32, non-fusion,
    with the text vocabulary sized to ``tokenizer``. Initialised from torch's global RNG."""
    from transformers import RobertaConfig

    cm = _clap_module()
    rcfg = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=TEXT_DIM, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                         max_position_embeddings=POSITION_ROWS, type_vocab_size=1, layer_norm_eps=1e-5,
                         initializer_range=0.02, pad_token_id=tokenizer.pad_id, bos_token_id=0, eos_token_id=2)
    with _roberta_from_config(cm.model, rcfg):
        model, model_cfg = cm.create_model("HTSAT-tiny", "roberta", precision="fp32", device=torch.device("cpu"),
                                           enable_fusion=False)
    assert model_cfg["audio_cfg"]["sample_rate"] == CLAP_SAMPLE_RATE
    assert model_cfg["audio_cfg"]["clip_samples"] == CLIP_SAMPLES and model.joint_embed_shape == EMBED_DIM
    return model


class Clap(nn.Module):
    """Frozen LAION-CLAP: ``embed_text``, ``embed_audio`` (L2-normalised 512-d) and ``score``."""

    def __init__(self, cfg: ClapConfig = ClapConfig()):
        super().__init__()
        self.cfg = cfg
        if cfg.weights == "random":
            self.tokenizer: BpeTokenizer = ClipBpe()
            self.model = demo_weights.seeded(cfg.seed, lambda: build_model(self.tokenizer),
                                             key=("laion_clap", self.tokenizer.id))
            self.weights_label, self.weights_sha256 = "random", f"random-seed{cfg.seed}"
        elif cfg.weights == "demo":
            self.tokenizer = ClipBpe()
            path = demo_weights.demo_file("clap")
            self.model, sha = demo_weights.load(path, lambda: build_model(self.tokenizer))
            self.weights_label, self.weights_sha256 = "demo", sha
        else:
            path = assets.require("clap") if cfg.weights == "pretrained" else Path(cfg.weights)
            if not path.is_file():
                raise assets.no_weights_file("CLAP", "weights", cfg.weights, path,
                                             f"`{assets.PREFETCH} clap` fetches the pretrained one")
            if path.resolve() == demo_weights.demo_file("clap").resolve():  # an overlay, not a laion-clap checkpoint
                raise ConfigError(f"weights={cfg.weights} is the demo CLAP file: give weights=demo")
            self.tokenizer = RobertaBpe(assets.require("roberta_vocab"), assets.require("roberta_merges"))
            try:
                sd, sha = load_hashed(path, load_torch_weights)
                sd = laion_state_dict(sd)
            except Exception as e:
                raise CheckpointError(f"{path} is not a readable laion-clap checkpoint: {e}") from None
            arch = f"{path} does not fit laion-clap HTSAT-tiny non-fusion + RoBERTa (630k-audioset-best.pt does)"
            words = sd.get("text_branch.embeddings.word_embeddings.weight")
            if words is None or "audio_branch.patch_embed.proj.weight" not in sd:
                raise WeightsMismatchError(f"{arch}: it has no RoBERTa text branch / HTSAT audio branch")
            if tuple(words.shape) != (self.tokenizer.vocab_size, TEXT_DIM):
                raise WeightsMismatchError(f"{arch}: text vocabulary {tuple(words.shape)}, the RoBERTa tokenizer "
                                           f"needs ({self.tokenizer.vocab_size}, {TEXT_DIM})")
            self.model = build_model(self.tokenizer)
            try:
                self.model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise WeightsMismatchError(f"{arch}: {e}") from None
            self.weights_label, self.weights_sha256 = assets.label("clap", path, sha), sha
        self.model.eval().requires_grad_(False)

    @property
    def id(self) -> str:
        """Identity for cache keys: changes with the weights and with the tokenizer."""
        return f"laion-clap-htsat-tiny-{weights_tag(self.weights_sha256)}-{self.tokenizer.id}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def card(self) -> dict:
        """What a CLAP number depends on, for the results' protocol card."""
        note = {"weights_note": demo_weights.LABEL} if self.weights_label == "demo" else {}
        checkpoint = {"random": "random", "demo": demo_weights.demo_file("clap").name,
                      "pretrained": assets.path("clap").name}.get(self.cfg.weights, Path(self.cfg.weights).name)
        return {"model": "laion-clap HTSAT-tiny non-fusion + RoBERTa", "weights": self.weights_label, **note,
                "checkpoint": checkpoint,
                "weights_sha256": self.weights_sha256, "tokenizer": self.tokenizer.id,
                "text_max_length": MAX_TEXT_LENGTH, "sample_rate": CLAP_SAMPLE_RATE, "resampler": RESAMPLER,
                "audio": AUDIO_PROTOCOL, "id": self.id}

    @torch.no_grad()
    def text_forward(self, captions: Sequence[str], max_length: int = MAX_TEXT_LENGTH
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> (RoBERTa last hidden states [B, L, 768] (zero at padding), mask [B, L] bool,
        CLAP text embedding [B, 512] L2-normalised): laion-clap's ``encode_text`` for roberta."""
        ids, mask = self.tokenizer(captions, max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model.text_branch(input_ids=ids, attention_mask=mask)
        pooled = F.normalize(self.model.text_projection(out["pooler_output"]), dim=-1)
        states = out["last_hidden_state"] * mask[..., None]
        return states, mask.bool(), pooled

    def embed_text(self, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """captions -> [B, 512], L2-normalised."""
        if len(captions) == 0:
            raise ValueError("no captions to embed")
        return torch.cat([self.text_forward(captions[i:i + batch_size])[2]
                          for i in range(0, len(captions), batch_size)])

    def prepare_audio(self, wav: torch.Tensor | Sequence[torch.Tensor], sample_rate: int = 16_000) -> torch.Tensor:
        """wav [B, N] (or a list of 1-D clips of any lengths) at ``sample_rate`` -> HTSAT input
        [B, 480000] at 48 kHz: resample, quantise to 16 bit, first 10 s, repeat-pad."""
        import torchaudio.functional as AF

        clips = list(wav) if isinstance(wav, (list, tuple)) or wav.dim() > 1 else [wav]
        if len(clips) == 0:
            raise ValueError("no audio clips to embed")
        out = []
        for x in clips:
            x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
            if x.numel() == 0:
                raise ValueError("empty audio clip")
            if sample_rate != CLAP_SAMPLE_RATE:
                x = AF.resample(x, sample_rate, CLAP_SAMPLE_RATE)
            # laion-clap's int16_to_float32(float32_to_int16(x)): clip, truncate to int16, rescale
            x = (x.clamp(-1.0, 1.0) * 32767.0).to(torch.int16).to(torch.float32) / 32767.0
            x = x[:CLIP_SAMPLES]  # deterministic: the first 10 s (laion-clap: a random 10 s crop)
            if x.numel() < CLIP_SAMPLES:  # laion-clap's "repeatpad": whole repeats, then zeros
                x = F.pad(x.repeat(CLIP_SAMPLES // x.numel()), (0, CLIP_SAMPLES % x.numel()))
            out.append(x)
        return torch.stack(out)

    @torch.no_grad()
    def embed_audio(self, wav: torch.Tensor | Sequence[torch.Tensor], sample_rate: int = 16_000,
                    batch_size: int = 16) -> torch.Tensor:
        """wav [B, N] at ``sample_rate`` (default 16 kHz, the codec's rate) -> [B, 512], L2-normalised."""
        x = self.prepare_audio(wav, sample_rate)
        embs = []
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size].to(self.device)
            data = [{"waveform": w, "longer": torch.tensor([False])} for w in chunk]
            embs.append(self.model.get_audio_embedding(data))  # laion-clap: branch -> projection -> L2
        return torch.cat(embs)

    def score(self, wav: torch.Tensor | Sequence[torch.Tensor], captions: Sequence[str],
              sample_rate: int = 16_000) -> torch.Tensor:
        """Cosine between clip i and caption i -> [B] (the CLAP score is its mean; x100 in tables)."""
        if len(wav) != len(captions):
            raise ValueError(f"{len(wav)} clips but {len(captions)} captions")
        return (self.embed_audio(wav, sample_rate) * self.embed_text(captions).to(self.device)).sum(-1)
