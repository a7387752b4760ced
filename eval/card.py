"""The protocol card every results file carries, and the Table-1 row printed from it.

A number without its card is not reported: the published tools disagree on KL direction,
resampler, backbone, IS shuffling, CLAP checkpoint and test subset, and each of these moves the
numbers. Random weights make every number meaningless for comparison, so the card and every
printed table say so in capitals.
"""
from __future__ import annotations

import datetime
import platform
import re
from importlib import metadata

from siren.runtime import code_version

RANDOM_BANNER = "RANDOM WEIGHTS - NOT COMPARABLE TO PUBLISHED NUMBERS"
# A metric whose checkpoint is the one the evaluated run was aligned with in stage 2 (card key
# "reward_equals_metric"): its cells carry REWARD_MARK and every table says why.
REWARD_MARK = "†"
REWARD_NOTE = "reward = metric: the stage-2 reward of this run is this metric's checkpoint (optimised on it: inflated)"
# CLAP reject sampling (eval candidates=N) picks each clip by the CLAP metric's own model: marked the same way
SELECTION_REASON = "each clip is the best of {n} candidates by this metric's checkpoint (inflated)"
DEMO_BANNER = "demo weights (trained on the embedded set) - not comparable to published numbers"
FILE_BANNER = "weights from files given by path, not the published ones - compare only with runs of the same files"
TABLE_COLUMNS = (("FAD", "fad"), ("FD", "fd"), ("ISC", "isc"), ("KL", "kl"), ("CLAP", "clap"))
PACKAGES = ("torch", "torchaudio", "numpy", "scipy", "panns-inference", "torchlibrosa", "torchvggish", "resampy",
            "librosa", "soxr", "laion-clap", "transformers", "soundfile", "safetensors")
REQUIRED = ("weights", "backbones", "audio", "metrics", "reference", "generated", "n_clips", "versions",
            "code_version", "created")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def weights_label(backbone_cards: dict[str, dict], generated: dict | None = None) -> str:
    """One mode, or every part's: the metric networks' and, for clips generated here, the run's codec and text
    encoder (a demo-trained run scored with the pretrained metrics is not a pretrained result)."""
    parts = {k: c["weights"] for k, c in backbone_cards.items()}
    parts.update({f"generation {k}": w for k, w in ((generated or {}).get("frontends_weights") or {}).items()})
    labels = set(parts.values())
    return labels.pop() if len(labels) == 1 else "mixed: " + ", ".join(f"{k}={w}" for k, w in parts.items())


def metric_descriptions(cfg, computed: list[str], clap_checkpoint: str) -> dict:
    """How each metric of an evaluation with ``cfg`` (eval.config.EvalConfig) is computed: the card's "metrics"."""
    return {
        "computed": computed,
        "fd": {"backbone": "fd_kl_is", "feature": "embedding (2048-d, one per clip)",
               "gaussian": "mean and unbiased covariance (np.cov) of each set, float64",
               "sqrtm": ("N > D: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2) by eigh, roundoff negatives clipped; "
                         "N <= D: the same trace as the nuclear norm of X Y' (centred sets / sqrt(N-1)), by SVD")},
        "fad": {"backbone": "fad", "feature": "VGGish 128-d per 0.96 s example, all examples of a set pooled",
                "gaussian": "as fd", "sqrtm": "as fd", "short_clips": f"vggish_short={cfg.vggish_short}",
                "frames_keys": "fad_frames_gen, fad_frames_ref (VGGish examples per set)"},
        "kl": {"direction": "KL(ref||gen)", "value_key": "kl", "other_direction_key": "kl_gen_ref (KL(gen||ref))",
               "probabilities": "softmax over the 527 PANNs logits (pre-sigmoid)", "pairing": "by clip id",
               "reduction": "sum over classes, mean over clips",
               "eps": cfg.kl_eps, "eps_use": "sum p_ref * (log p_ref - log(p_gen + eps)) as audioldm_eval (0 = exact)",
               "sigmoid_keys": "kl_sigmoid, kl_sigmoid_gen_ref: the same sum with per-class sigmoid probabilities "
                               "(audioldm_eval kullback_leibler_divergence_sigmoid; not a divergence: they do "
                               "not sum to 1)"},
        "isc": {"on": "softmax over the PANNs logits of the generated clips", "splits": cfg.is_splits,
                "shuffle_seed": cfg.is_seed, "shuffle": "numpy RandomState(seed).permutation, as audioldm_eval",
                "value_key": "isc (mean over splits)", "std_key": "isc_std"},
        "clap": {"checkpoint": clap_checkpoint,
                 "score": "mean cosine(text(caption), audio(generated clip)) x 100",
                 "caption": f"caption_index={cfg.caption_index}"},
    }


def audio_description(crop: str, crop_s: float | None, backbone_cards: dict[str, dict]) -> dict:
    """How the clips were read and fed to each backbone: the card's "audio"."""
    return {"loader": "soundfile, float32, all channels", "crop": crop,
            "crop_rule": "whole file" if crop_s is None else f"first {crop_s:g} s of each file",
            "channel": {role: c["channel"] for role, c in backbone_cards.items()},
            "resampler": {role: c["resampler"] for role, c in backbone_cards.items()},
            "pad": "per backbone, see backbones.*.min_samples and backbones.fad.short"}


def build(backbone_cards: dict[str, dict], audio: dict, metrics: dict, reference: dict, generated: dict,
          n_clips: int, device: str) -> dict:
    """The card: ``backbone_cards`` maps a role (fd_kl_is, fad, clap) to ``Backbone.card()``."""
    label = weights_label(backbone_cards, generated)
    card = {
        "weights": label,
        "backbones": backbone_cards,
        "audio": audio,
        "metrics": metrics,
        "reference": reference,
        "generated": generated,
        "n_clips": n_clips,
        "device": device,
        "versions": package_versions(),
        "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if label != "pretrained":
        card = {"WARNING": banner(label), **card}
    return card


def banner(label: str) -> str:
    """What a card or table with weights ``label`` (not pretrained) must say about its numbers: decided by each
    part's mode (``weights_label``), not by words inside a path ("file /x/randomized/clap.pt" is not RANDOM)."""
    from siren.assets import FILE_LABEL
    from siren.demo_weights import LABEL

    parts = [label] if not label.startswith("mixed: ") else \
        [p.split("=", 1)[1] for p in re.split(r", (?=[a-z_ ]+=)", label[len("mixed: "):])]
    if "random" in parts:
        return RANDOM_BANNER
    said = [FILE_BANNER] * any(p.startswith(FILE_LABEL) for p in parts) + [DEMO_BANNER] * any(
        p in ("demo", LABEL) for p in parts)
    return "; ".join(said) or DEMO_BANNER


def is_random(card: dict) -> bool:
    return card.get("weights") != "pretrained"


def table(rows: list[tuple[str, dict]], card: dict) -> str:
    """Markdown Table-1 rows (FAD, FD, ISC, KL, CLAP) with a banner row when the weights are not pretrained."""
    head = "| system | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    if is_random(card):
        lines.append(f"| **{banner(card['weights'])}** |" + " |" * len(TABLE_COLUMNS))
    marked = set(card.get("reward_equals_metric", []))
    for name, m in rows:
        cells = [(f"{m[k]:.2f}" + (REWARD_MARK if k in marked else "")) if m.get(k) is not None else "-"
                 for _, k in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fd = card["backbones"].get("fd_kl_is", {})
    lines.append(f"\n{card['n_clips']} clips; FD/KL/IS: {fd.get('id', '-')}; "
                 f"KL {card['metrics'].get('kl', {}).get('direction', '-')}; "
                 f"weights: {card['weights']}" + (f"  ** {banner(card['weights'])} **" if is_random(card) else ""))
    for m in sorted(marked):  # the metric's own note says why: a stage-2 reward, reject sampling, or both
        why = card["metrics"].get(m, {}).get("reward_equals_metric", REWARD_NOTE)
        lines.append(f"{REWARD_MARK} {m.upper()}: {why}")
    return "\n".join(lines)
