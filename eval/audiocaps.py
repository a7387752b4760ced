"""Evaluate a trained run, or a folder of generated clips, against the AudioCaps test set (or any
reference manifest).

    python eval/audiocaps.py ckpt=RUN_DIR ref=MANIFEST weights=pretrained out=DIR
    python eval/audiocaps.py gen_dir=FOLDER ref=MANIFEST weights=pretrained out=DIR

``ckpt=`` generates one clip per reference caption with the run (eval/generate.py: batched,
seeded, resumable, ``candidates=N`` for CLAP reject sampling) into ``DIR/gen`` and evaluates
those. ``ref=demo`` is the embedded demo set's test split. FOLDER holds ``<id>.wav`` for every reference id (any sample rate, any system). Writes
``DIR/results.json`` (metrics, per-clip scores and the protocol card) and prints a Table-1 row
(FAD, FD, ISC, KL, CLAP). ``weights=random`` runs the same code with seeded random backbones
(smoke tests only; every output says so). Embeddings are cached (``cache_dir=``), so evaluating
the same clips again costs only reading them.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/audiocaps.py`: import from the repo root, not eval/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from eval import card as cards
from eval import metrics as M
from eval.audio import CROP, MONO, BadAudioError, Clip, load_clips
from eval.backbones import RESAMPLER, Backbone, ClapAudio, PannsCnn14, VGGish
from eval.cache import EmbeddingCache, embed_clips, embed_texts
from eval.reference import ManifestError, file_sha256, match_generated, read_manifest, select, set_hash
from siren.assets import MissingWeightsError
from siren.config import ConfigError, load_config, to_dict
from siren.io import write_json
from siren.sample import SampleConfig

METRICS = ("fad", "fd", "isc", "kl", "clap")


@dataclass
class EvalConfig:
    ckpt: str = ""  # a run directory (siren.load): generate for every reference caption, then evaluate
    gen_dir: str = ""  # folder of generated <id>.wav
    ref: str = ""  # reference manifest, CSV or JSONL with columns id,audio,caption; "demo": the demo test split
    out: str = ""  # results folder; default: <gen_dir>_eval beside gen_dir
    name: str = ""  # system name in the printed row; default: the gen_dir folder name
    # pretrained | demo (trained on the embedded set, siren.demo_assets) | random (seeded smoke-test backbones);
    # anything but pretrained is flagged in every card and table
    weights: str = "pretrained"
    seed: int = 0  # seed of the random backbone weights
    metrics: str = "fad,fd,isc,kl,clap"  # which of fad, fd, isc, kl, clap to compute
    caption_index: int = 0  # which caption of each id (AudioCaps has 5 rows per clip), for the CLAP score
    subset: str = ""  # optional file of reference ids (one per line) to evaluate on
    max_seconds: float = 10.0  # crop every clip to its first max_seconds (<= 0: whole clips)
    batch_size: int = 8
    cache_dir: str = ""  # embedding cache; default $SIREN_CACHE/embeddings
    cache: bool = True
    is_splits: int = M.IS_SPLITS
    is_seed: int = M.IS_SEED
    kl_eps: float = M.KL_EPS  # audioldm_eval's epsilon inside log(p_gen + eps); 0 = exact KL
    device: str = "cpu"  # cpu | cuda | auto
    # generation (ckpt= only); Table 1 times a batch of 16 clips of 10 s
    seconds: float = 10.0
    gen_batch_size: int = 16
    gen_seed: int = 0
    candidates: int = 1  # > 1: CLAP-score reject sampling, the best of N per caption (paper, after GenAU)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


class EvalError(ValueError):
    pass


def _metric_list(cfg: EvalConfig) -> list[str]:
    want = [m.strip().lower() for m in cfg.metrics.split(",") if m.strip()]
    bad = [m for m in want if m not in METRICS]
    if bad or not want:
        raise ConfigError(f"metrics={cfg.metrics!r}: unknown {bad}; choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in want]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_reference(cfg: EvalConfig):
    """(items, reference card part) of the manifest, caption choice and subset of ``cfg``."""
    items = select(read_manifest(cfg.ref), cfg.ref, cfg.caption_index, cfg.subset or None)
    ref_card = {"manifest": str(Path(cfg.ref).resolve()), "manifest_sha256": file_sha256(cfg.ref),
                "caption_index": cfg.caption_index,
                "caption_choice": f"the caption on the {cfg.caption_index}-th row (0-based, file order) of each id",
                "subset": str(Path(cfg.subset).resolve()) if cfg.subset else "all ids of the manifest",
                "subset_sha256": file_sha256(cfg.subset) if cfg.subset else None}
    return items, ref_card


def backbones(cfg: EvalConfig) -> dict[str, Backbone]:
    """The backbones ``cfg.metrics`` needs, by role (identity only: networks are built on first use).

    With weights=pretrained this checks the weight files first, so a missing one fails at once.
    """
    if cfg.weights not in ("pretrained", "demo", "random"):
        raise ConfigError(f"weights must be pretrained, demo or random, got {cfg.weights!r}")
    which, device = _metric_list(cfg), _device(cfg.device)
    roles = {"fd_kl_is": ({"fd", "kl", "isc"}, PannsCnn14), "fad": ({"fad"}, VGGish), "clap": ({"clap"}, ClapAudio)}
    out, missing = {}, []
    for role, (needs, cls) in roles.items():
        if needs & set(which):
            try:
                out[role] = cls(cfg.weights, cfg.seed, device)
            except MissingWeightsError as e:
                missing.append(str(e))
    if missing:
        raise MissingWeightsError("\n".join(missing))
    return out


def evaluate_sets(gen: list[Clip], ref: list[Clip], captions: list[str], cfg: EvalConfig,
                  ref_card: dict | None = None, gen_card: dict | None = None,
                  models: dict[str, Backbone] | None = None) -> dict:
    """Metrics, per-clip scores and protocol card for generated clips paired (by position) with reference clips.

    ``gen[i]`` and ``ref[i]`` must have the same id; ``captions[i]`` is the prompt of clip i.
    This is the entry for any producer of clips: a folder (``evaluate``) or a sampler writing wavs.
    """
    which = _metric_list(cfg)
    n = len(gen)
    if n < 2:
        raise EvalError(f"need at least 2 clips to evaluate, got {n}")
    if [c.id for c in gen] != [c.id for c in ref] or len(captions) != n:
        raise EvalError("generated and reference clips must be paired by id, in the same order, with one caption each")
    if "isc" in which and n < cfg.is_splits:
        raise EvalError(f"IS with is_splits={cfg.is_splits} needs at least that many clips, got {n}; "
                        f"pass is_splits=K (K <= {n}) or leave isc out of metrics=")
    models = models if models is not None else backbones(cfg)
    cache = EmbeddingCache(cfg.cache_dir or None) if cfg.cache else None
    bb_cards, cache_stats, per_clip = {}, {}, {"id": [c.id for c in gen], "caption": list(captions)}
    values: dict[str, float | None] = {m: None for m in METRICS}

    def run(backbone, role):
        bb_cards[role] = backbone.card()
        r, sr = embed_clips(backbone, ref, cache, cfg.batch_size, f"{backbone.name} ref")
        g, sg = embed_clips(backbone, gen, cache, cfg.batch_size, f"{backbone.name} gen")
        cache_stats[role] = {"hits": sr.hits + sg.hits, "computed": sr.computed + sg.computed}
        return r, g

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if {"fd", "kl", "isc"} & set(which):
            r, g = run(models["fd_kl_is"], "fd_kl_is")
            if "fd" in which:
                values["fd"] = M.frechet_distance_from_embeddings(
                    np.stack([e["embedding"] for e in g]), np.stack([e["embedding"] for e in r]),
                    names=("FD, generated", "FD, reference"))
            ref_logits, gen_logits = np.stack([e["logits"] for e in r]), np.stack([e["logits"] for e in g])
            if "kl" in which:
                kl = M.kl_divergence(ref_logits, gen_logits, cfg.kl_eps)
                kl_rev = M.kl_divergence(gen_logits, ref_logits, cfg.kl_eps)
                values["kl"], values["kl_gen_ref"] = float(kl.mean()), float(kl_rev.mean())
                per_clip["kl"], per_clip["kl_gen_ref"] = kl.tolist(), kl_rev.tolist()
            if "isc" in which:
                values["isc"], values["isc_std"] = M.inception_score(gen_logits, cfg.is_splits, cfg.is_seed)
        if "fad" in which:
            r, g = run(models["fad"], "fad")
            values["fad"] = M.frechet_distance_from_embeddings(
                np.concatenate([e["frames"] for e in g]), np.concatenate([e["frames"] for e in r]),
                names=("FAD, generated", "FAD, reference"))
        if "clap" in which:
            clap = models["clap"]
            bb_cards["clap"] = clap.card()
            g, sg = embed_clips(clap, gen, cache, cfg.batch_size, "clap gen")
            text, st = embed_texts(clap, captions, cache)
            cache_stats["clap"] = {"hits": sg.hits + st.hits, "computed": sg.computed + st.computed}
            cos = M.clap_cosine(text, np.stack([e["audio"] for e in g]))
            values["clap"] = float(100.0 * cos.mean())
            per_clip["clap_cosine"] = cos.tolist()
    caught = sorted({str(x.message) for x in w if issubclass(x.category, M.FewSamplesWarning)})
    for msg in caught:  # kept in results.json too
        print(f"warning: {msg}", file=sys.stderr)
    for x in w:  # everything else goes on as usual
        if not issubclass(x.category, M.FewSamplesWarning):
            warnings.warn_explicit(x.message, x.category, x.filename, x.lineno)

    metric_card = {
        "computed": which,
        "fd": {"backbone": "fd_kl_is", "feature": "embedding (2048-d, one per clip)",
               "gaussian": "mean and unbiased covariance (np.cov) of each set, float64",
               "sqrtm": ("N > D: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2) by eigh, roundoff negatives clipped; "
                         "N <= D: the same trace as the nuclear norm of X Y' (centred sets / sqrt(N-1)), by SVD")},
        "fad": {"backbone": "fad", "feature": "VGGish 128-d per 0.96 s example, all examples of a set pooled",
                "gaussian": "as fd", "sqrtm": "as fd"},
        "kl": {"direction": "KL(ref||gen)", "value_key": "kl", "other_direction_key": "kl_gen_ref (KL(gen||ref))",
               "probabilities": "softmax over the 527 PANNs logits (pre-sigmoid)", "pairing": "by clip id",
               "reduction": "sum over classes, mean over clips",
               "eps": cfg.kl_eps, "eps_use": "sum p_ref * (log p_ref - log(p_gen + eps)) as audioldm_eval (0 = exact)"},
        "isc": {"on": "softmax over the PANNs logits of the generated clips", "splits": cfg.is_splits,
                "shuffle_seed": cfg.is_seed, "shuffle": "numpy RandomState(seed).permutation, as audioldm_eval",
                "value_key": "isc (mean over splits)", "std_key": "isc_std"},
        "clap": {"checkpoint": bb_cards.get("clap", {}).get("weights_sha256", "not computed"),
                 "score": "mean cosine(text(caption), audio(generated clip)) x 100",
                 "caption": f"caption_index={cfg.caption_index}"},
    }
    audio_card = {"loader": "soundfile, float32", "mono": MONO, "max_seconds": cfg.max_seconds, "crop": CROP,
                  "resampler": RESAMPLER, "pad": "per backbone, see backbones.*.min_samples"}
    ref_card = {**(ref_card or {}), "n_clips": n, "set_sha256": set_hash(ref, captions)}
    gen_card = {**(gen_card or {}), "n_clips": n, "set_sha256": set_hash(gen)}
    card = cards.build(bb_cards, audio_card, metric_card, ref_card, gen_card, n, _device(cfg.device))
    return {"metrics": values, "card": card, "config": to_dict(cfg), "warnings": caught, "cache": cache_stats,
            "per_clip": per_clip}


def evaluate(cfg: EvalConfig) -> dict:
    """Read the reference, generate with ``ckpt`` (or read ``gen_dir``), evaluate, write results.json.

    A run that cannot generate gets results.json with status "itg" and the reason (and no metrics)."""
    if bool(cfg.ckpt) == bool(cfg.gen_dir) or not cfg.ref:
        raise ConfigError("pass ref=MANIFEST (id,audio,caption; or ref=demo) and exactly one of ckpt=RUN_DIR "
                          "(generate, then evaluate) or gen_dir=FOLDER (generated <id>.wav files)")
    if cfg.ref == "demo":  # the embedded demo set's test split, made deterministically (seed 0)
        from siren.assets import cache_dir
        from siren.data.demo import make_demo

        cfg = dataclasses.replace(cfg, ref=str(make_demo(cache_dir() / "demo").parent / "test.csv"))
    models = backbones(cfg)
    items, ref_card = load_reference(cfg)
    if len(items) < 2:
        raise EvalError(f"the reference set has {len(items)} clip(s); at least 2 are needed")
    gen_card = {}
    if cfg.ckpt:
        from eval.generate import CannotGenerate, generate_set

        gen_dir = output_dir(cfg) / "gen"
        try:
            gen_card = generate_set(cfg.ckpt, [it.id for it in items], [it.caption for it in items], gen_dir,
                                    seconds=cfg.seconds, batch_size=cfg.gen_batch_size, seed=cfg.gen_seed,
                                    sample=cfg.sample, candidates=cfg.candidates,
                                    clap=models["clap"].net if cfg.candidates > 1 else None, device=_device(cfg.device))
        except CannotGenerate as e:
            results = {"status": "itg", "reason": str(e), "metrics": {}, "config": to_dict(cfg)}
            write_json(output_dir(cfg) / "results.json", results)
            return results
        cfg = dataclasses.replace(cfg, gen_dir=str(gen_dir))
    gen_paths = match_generated(cfg.gen_dir, [it.id for it in items])
    clips, errors = {}, []
    for what, paths in [("reference", {it.id: it.audio for it in items}), ("generated", gen_paths)]:
        try:
            clips[what] = load_clips(paths, cfg.max_seconds, what)
        except BadAudioError as e:
            errors.append(str(e))
    if errors:
        raise BadAudioError("\n".join(errors))
    results = evaluate_sets(clips["generated"], clips["reference"], [it.caption for it in items], cfg, ref_card,
                            {"dir": str(Path(cfg.gen_dir).resolve()), **gen_card}, models)
    results["status"] = "ok"
    write_json(Path(output_dir(cfg)) / "results.json", results)
    return results


def evaluate_run(run_dir: str, ref: str, out: str, weights: str, overrides: list[str] = ()) -> dict:
    """The ablation grid's eval step: ``ckpt=run_dir`` with the cell's eval.* keys; returns the status."""
    cfg = load_config(EvalConfig, [f"ckpt={run_dir}", f"ref={ref}", f"out={out}", f"weights={weights}", *overrides])
    res = evaluate(cfg)
    return {"status": res["status"], "reason": res.get("reason", ""), "metrics": res["metrics"]}


def output_dir(cfg: EvalConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.ckpt:
        return Path(cfg.ckpt) / "eval"
    g = Path(cfg.gen_dir).resolve()
    return g.parent / f"{g.name}_eval"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        print("keys: " + ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(EvalConfig)))
        return 0
    try:
        cfg = load_config(EvalConfig, argv)
        results = evaluate(cfg)
    except (ConfigError, ManifestError, BadAudioError, EvalError, MissingWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = cfg.name or Path(cfg.ckpt or cfg.gen_dir).resolve().name
    if results["status"] == "itg":
        print(f"{name}: itg (inability to generate): {results['reason']}")
        print(f"results: {output_dir(cfg) / 'results.json'}")
        return 0
    print(cards.table([(name, results["metrics"])], results["card"]))
    print(f"results: {output_dir(cfg) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
