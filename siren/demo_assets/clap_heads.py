"""Demo LAION-CLAP: the projection heads trained contrastively on the demo captions.

The network is ``siren.clap.build_model`` (laion_clap's CLAP, HTSAT-tiny + RoBERTa) at its seeded
random init, tokenized with the CLIP BPE bundled in laion_clap (RoBERTa's BPE files are a download).
The recipe re-estimates HTSAT's input BatchNorm (``bn0``) on demo audio, caches the two branches'
outputs (HTSAT's 768-d ``embedding``, RoBERTa's 768-d pooler output) and trains ``audio_projection``
and ``text_projection`` with CLAP's symmetric contrastive loss (temperature 0.07, CLAP's initial
value), so the CLAP score and the stage-2 reward respond to whether audio matches text. The text
branch (whose hidden states condition the models, ``siren.text``) stays at its random init.

Every clip is fitted (and measured) in each of ``VIEWS``, the ways audio reaches HTSAT at 48 kHz:
- both resamplers: the stage-2 reward hands CLAP 16 kHz audio that ``Clap.prepare_audio`` resamples with
  torchaudio, the CLAP metric resamples as laion_clap reads files (librosa, soxr). 16 kHz audio has nothing
  above 8 kHz, so HTSAT's top mel bands hold only each resampler's stopband, and ``bn0`` fitted on one of them
  shifts the other's by 0.8-2.7 standard deviations: heads fitted on torchaudio alone kept a matched cosine of
  0.33 through the metric's path against 0.49 through their own (docs/demo/notes.md, "Demo CLAP and the
  resampler");
- the clip's first second: the demo models generate exactly 1 s, which laion_clap's repeat-padding turns into
  ten whole repeats, while the 1-2 s training clips mostly end in zeros; heads that never saw the first pattern
  scored a generated clip 2.4-4.8 points higher with one sample more (nine repeats and a second of zeros);
- a 44.1 kHz PCM16 file: its quantisation noise fills the band above 8 kHz that a 16 kHz clip leaves empty
  (-4.3 points on heads fitted without it; docs/demo/notes.md, "Demo CLAP, repeat-padding and the file's
  sample rate").
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from siren.demo_assets.data import Split
from siren.demo_assets.fit import _batches, fit

TEMPERATURE = 0.07


def _pcm16_file(x: np.ndarray, sr: int) -> np.ndarray:
    """``x`` written as a PCM16 WAV (in memory) and read back as eval reads files."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype="PCM_16", format="WAV")
    buf.seek(0)
    return sf.read(buf, dtype="float32")[0]


def view(how: str, wav: np.ndarray) -> np.ndarray:
    """One 16 kHz clip as HTSAT gets it in view ``how`` (see the module docstring), at 48 kHz."""
    from eval.audio import resample
    from siren.clap import CLAP_SAMPLE_RATE

    if how == "first_1s":
        return resample(wav[:16_000], 16_000, CLAP_SAMPLE_RATE, "librosa")
    if how == "pcm16_44k":
        at_44k = _pcm16_file(resample(wav, 16_000, 44_100, "librosa"), 44_100)
        return resample(at_44k, 44_100, CLAP_SAMPLE_RATE, "librosa")
    return resample(wav, 16_000, CLAP_SAMPLE_RATE, how)  # a resampler of eval.backbones


# the reward's resampler, the metric's, the demo models' clip length, a file at another rate
VIEWS = ("torchaudio", "librosa", "first_1s", "pcm16_44k")


def make_base() -> nn.Module:
    """The CLAP network with the vocabulary of the demo tokenizer; call under a seed (``siren.demo_weights.seeded``)."""
    from siren.clap import ClipBpe, build_model

    return build_model(ClipBpe())


def at_48k(d: Split) -> Split:
    """``d`` (16 kHz) in each of ``VIEWS`` at CLAP's rate; a clip's source gains the view's name
    ("original/librosa")."""
    out = Split([], [], np.concatenate([d.labels] * len(VIEWS)), [])
    for how in VIEWS:
        out.wavs += [view(how, w) for w in d.wavs]
        out.captions += d.captions
        out.source += [f"{s}/{how}" for s in d.source]
    return out


@torch.no_grad()
def branch_features(clap, data: dict[str, Split]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (audio branch output [n, 768], text branch pooler output [n, 768])}; audio at 48 kHz."""
    from siren.clap import CLAP_SAMPLE_RATE

    out, m = {}, clap.model
    for k, d in data.items():
        got: list[torch.Tensor] = []
        hook = m.audio_projection.register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
        try:
            for s in tqdm(list(_batches(len(d), 16)), desc=f"clap audio {k}", leave=False):
                clap.embed_audio(d.wavs[s], sample_rate=CLAP_SAMPLE_RATE)
        finally:
            hook.remove()
        audio, got = torch.cat(got), []
        hook = m.text_projection.register_forward_pre_hook(lambda mod, inp: got.append(inp[0]))
        try:
            clap.embed_text(d.captions)
        finally:
            hook.remove()
        out[k] = (audio, torch.cat(got))
    return out


@torch.no_grad()
def set_input_statistics(clap, wavs: list, batch: int = 16) -> None:
    """HTSAT's ``bn0`` normalises each mel band of its log-mel input: its running mean and variance become
    the per-band mean and variance over ``wavs`` (48 kHz; only the two feature extractors before it run)."""
    from siren.clap import CLAP_SAMPLE_RATE

    br, total, total_sq, n = clap.model.audio_branch, 0.0, 0.0, 0
    for s in _batches(len(wavs), batch):
        mel = br.logmel_extractor(br.spectrogram_extractor(clap.prepare_audio(wavs[s], CLAP_SAMPLE_RATE)))
        flat = mel.reshape(-1, mel.shape[-1]).double()
        total, total_sq, n = total + flat.sum(0), total_sq + (flat ** 2).sum(0), n + len(flat)
    mean = total / n
    br.bn0.running_mean.copy_(mean)
    br.bn0.running_var.copy_((total_sq / n - mean ** 2) * n / (n - 1))


def _standardised_head(proj: nn.Sequential, x: torch.Tensor):
    """proj's first Linear sees standardised inputs while training; ``fold`` moves the standardisation
    into its weights (the random branches' outputs vary little around a large mean)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6 * float(x.std(0).max()))

    def fold() -> dict[str, torch.Tensor]:
        w = proj[0].weight / sd
        return {"0.weight": w, "0.bias": proj[0].bias - w @ mu,  # fp32: the folded scale spans decades
                "2.weight": proj[2].weight.half(), "2.bias": proj[2].bias.clone()}
    return (x - mu) / sd, fold


def contrastive_loss(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CLAP/CLIP symmetric InfoNCE over a batch of paired audio and text embeddings (normalised here)."""
    logits = nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(t, dim=-1).T / TEMPERATURE
    target = torch.arange(len(a))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def retrieval(audio: np.ndarray, text: np.ndarray, d: Split) -> dict:
    """Normalised embeddings of a split -> matched / mismatched cosines and top-1 retrieval accuracy."""
    cos = audio @ text.T
    same = d.labels[:, None] == d.labels[None]
    best = cos.argmax(1)
    src = np.array(d.source)
    out = {}
    for s in sorted(set(d.source)):
        r = src == s
        out[s] = {"matched_cosine": float(np.diag(cos)[r].mean()),
                  "other_class_cosine": float(cos[r][~same[r]].mean()),
                  "audio_to_text_top1_caption": float(np.mean([d.captions[j] == d.captions[i]
                                                               for i, j in zip(np.flatnonzero(r), best[r])])),
                  "audio_to_text_top1_class": float((d.labels[best[r]] == d.labels[r]).mean())}
    return out


def build_clap(data: dict[str, Split], seed: int = 0, steps: int = 400, per_class: int = 10
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """The CLAP recipe on the first ``per_class`` training clips of each class and source, each in every one
    of ``VIEWS``: -> (tensors to commit, numbers)."""
    from siren.clap import Clap, ClapConfig

    clap = Clap(ClapConfig(weights="random", seed=seed))
    # HTSAT reads 10 s per clip: the costly part
    data = {k: at_48k(d.subset_per_class(per_class) if k == "train" else d) for k, d in data.items()}
    train = data["train"]
    set_input_statistics(clap, train.wavs)
    feats = branch_features(clap, data)
    m = clap.model.requires_grad_(False)
    a_proj, t_proj = m.audio_projection.requires_grad_(True), m.text_projection.requires_grad_(True)
    za, fold_a = _standardised_head(a_proj, feats["train"][0])
    zt, fold_t = _standardised_head(t_proj, feats["train"][1])

    def loss_of(b):
        return contrastive_loss(a_proj(nn.functional.dropout(za[b], 0.2)), t_proj(nn.functional.dropout(zt[b], 0.2)))

    loss = fit(list(a_proj.parameters()) + list(t_proj.parameters()), loss_of, len(za), steps, seed,
               desc="clap heads")
    with torch.no_grad():
        trained = {**{f"audio_projection.{k}": v for k, v in fold_a().items()},
                   **{f"text_projection.{k}": v for k, v in fold_t().items()}}
        m.load_state_dict({**m.state_dict(), **{k: v.float() for k, v in trained.items()}})
        emb = {k: tuple(nn.functional.normalize(p(x), dim=-1).numpy() for p, x in zip((a_proj, t_proj), v))
               for k, v in feats.items()}
    meta = {"recipe": "HTSAT bn0 re-estimated; audio/text projection heads trained contrastively "
                      f"(symmetric InfoNCE, temperature {TEMPERATURE}); tokenizer: laion_clap's CLIP BPE; "
                      f"every clip at 48 kHz in each view of {', '.join(VIEWS)}",
            "steps": steps, "final_loss": loss, "test": retrieval(*emb["test"], data["test"]),
            "train": {k: v["matched_cosine"] for k, v in retrieval(*emb["train"], train).items()}}
    bn0 = m.audio_branch.bn0
    trained.update({"audio_branch.bn0.running_mean": bn0.running_mean.clone(),
                    "audio_branch.bn0.running_var": bn0.running_var.clone()})
    return trained, meta
