"""Evaluate a trained run, or a folder of generated clips, against the AudioCaps test set (or any
reference manifest).

    python eval/audiocaps.py ckpt=RUN_DIR ref=MANIFEST weights=pretrained out=DIR
    python eval/audiocaps.py gen_dir=FOLDER ref=MANIFEST weights=pretrained out=DIR

``ckpt=`` generates one clip per reference caption with the run (eval/generate.py: batched,
seeded, resumable, ``candidates=N`` for CLAP reject sampling) into ``DIR/gen`` and evaluates
those. ``ref=demo`` is the embedded demo set's test split. FOLDER holds ``<id>.wav`` for every
reference id (any sample rate, any system). Writes
``DIR/results.json`` (metrics, per-clip scores and the protocol card) and prints a Table-1 row
(FAD, FD, ISC, KL, CLAP). ``weights=random`` runs the same code with seeded random backbones
(smoke tests only; every output says so). Embeddings are cached (``cache_dir=``), so evaluating
the same clips again costs only reading them.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from eval import card as cards
from eval import metrics as M
from eval.audio import CROPS, BadAudioError, Clip, load_clips
from eval.backbones import Backbone, ClapAudio, PannsCnn14, VGGish
from eval.cache import EmbeddingCache, embed_clips, embed_texts
from eval.config import GENERATION_KEYS, METRICS, EvalConfig, max_is_splits, metric_list
from eval.reference import match_generated, select, set_hash
from siren.config import load_config, to_dict
from siren.data.manifest import read_manifest
from siren.errors import ConfigError, MissingWeightsError, SirenError
from siren.io import check_folder, sha256_file, write_json
from siren.lock import hold
from siren.run_dir import read_run_config, reward_model
from siren.runtime import resolve_device

log = logging.getLogger(__name__)

# Where the sampling defaults (siren.sample.SampleConfig) come from; on the card of every ckpt= run.
SAMPLING_SOURCE = ("the paper states no temperature, top-k or top-p; the defaults (temperature 1, top-k and top-p "
                   "off) sample the model's full distribution. AudioGen and MusicGen sample with top-k 250 "
                   "(sample.top_k=250 to compare)")
ROLE_OF = {"fd": "fd_kl_is", "kl": "fd_kl_is", "isc": "fd_kl_is", "fad": "fad", "clap": "clap"}  # backbone per metric


class EvalError(SirenError):
    """An evaluation that cannot be computed as asked (too few clips, unpaired sets)."""


def _device(name: str) -> str:
    return str(resolve_device(name))


def load_reference(cfg: EvalConfig, ref: str):
    """(items, reference card part) of the manifest ``ref``, with the caption choice and subset of ``cfg``."""
    items = select(read_manifest(ref, unique_ids=False), ref, cfg.caption_index, cfg.subset or None)
    ref_card = {"manifest": str(Path(ref).resolve()), "manifest_sha256": sha256_file(ref),
                "caption_index": cfg.caption_index,
                "caption_choice": f"the caption on the {cfg.caption_index}-th row (0-based, file order) of each id",
                "subset": str(Path(cfg.subset).resolve()) if cfg.subset else "all ids of the manifest",
                "subset_sha256": sha256_file(cfg.subset) if cfg.subset else None}
    return items, ref_card


def backbones(cfg: EvalConfig) -> dict[str, Backbone]:
    """The backbones ``cfg.metrics`` needs, by role (identity only: networks are built on first use).

    With weights=pretrained this checks the weight files first, so a missing one fails at once.
    """
    which, device = metric_list(cfg), _device(cfg.device)
    roles = {"fd_kl_is": ({"fd", "kl", "isc"}, PannsCnn14, dict(channel=cfg.channel, resampler=cfg.resampler)),
             "fad": ({"fad"}, VGGish, dict(channel=cfg.fad_channel, resampler=cfg.fad_resampler,
                                           short=cfg.vggish_short)),
             "clap": ({"clap"}, ClapAudio, dict(channel=cfg.clap_channel, resampler=cfg.clap_resampler))}
    out, missing = {}, []
    for role, (needs, cls, audio) in roles.items():
        if needs & set(which):
            try:
                out[role] = cls(cfg.weights, cfg.seed, device, **audio)
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
    which = metric_list(cfg)
    n = len(gen)
    if n < 2:
        raise EvalError(f"need at least 2 clips to evaluate, got {n}")
    if [c.id for c in gen] != [c.id for c in ref] or len(captions) != n:
        raise EvalError("generated and reference clips must be paired by id, in the same order, with one caption each")
    if "isc" in which and cfg.is_splits > max_is_splits(n):
        raise EvalError(f"IS with is_splits={cfg.is_splits} needs at least 2 clips a split ({2 * cfg.is_splits}), got "
                        f"{n}; pass is_splits=K (K <= {max(1, max_is_splits(n))}) or leave isc out of metrics=")
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
            if "kl" in which:  # softmax (reported) and sigmoid (audioldm_eval's second number), both directions
                for key, fn in [("kl", M.kl_divergence), ("kl_sigmoid", M.kl_sigmoid)]:
                    kl, kl_rev = fn(ref_logits, gen_logits, cfg.kl_eps), fn(gen_logits, ref_logits, cfg.kl_eps)
                    values[key], values[f"{key}_gen_ref"] = float(kl.mean()), float(kl_rev.mean())
                    per_clip[key], per_clip[f"{key}_gen_ref"] = kl.tolist(), kl_rev.tolist()
            if "isc" in which:  # in the order audioldm_eval reads the generated folder: its split depends on it
                order = M.folder_order([Path(c.path).name if c.path else f"{c.id}.wav" for c in gen])
                values["isc"], values["isc_std"] = M.inception_score(gen_logits[order], cfg.is_splits, cfg.is_seed)
        if "fad" in which:
            r, g = run(models["fad"], "fad")
            values["fad_frames_gen"], values["fad_frames_ref"] = (sum(len(e["frames"]) for e in s) for s in (g, r))
            few = [f"{w} {values[f'fad_frames_{w}']}" for w in ("gen", "ref") if values[f"fad_frames_{w}"] < 2]
            if few:  # every clip under one VGGish example (0.975 s), skipped: FAD has no covariance to compare
                raise EvalError(f"FAD needs at least 2 VGGish examples (0.975 s each) per set; got {', '.join(few)} "
                                f"(clips shorter than 0.975 s add none with vggish_short={cfg.vggish_short}): pass "
                                f"vggish_short=pad, or metrics= without fad")
            values["fad"] = M.frechet_distance_from_embeddings(
                np.concatenate([e["frames"] for e in g]), np.concatenate([e["frames"] for e in r]),
                names=("FAD, generated", "FAD, reference"))
        if "clap" in which:
            clap = models["clap"]
            bb_cards["clap"] = clap.card()
            g, sg = embed_clips(clap, gen, cache, cfg.batch_size, "clap gen")
            text, st = embed_texts(clap, captions, cache)
            cache_stats["clap"] = {"hits": sg.hits + st.hits, "computed": sg.computed + st.computed}
            audio = np.stack([e["audio"] for e in g])
            values["clap"] = M.clap_score(text, audio)
            per_clip["clap_cosine"] = M.clap_cosine(text, audio).tolist()
    few = [x.message for x in w if issubclass(x.category, M.FewSamplesWarning)]
    caught = sorted({str(m) for m in few})  # each in results.json; one line in the log (it printed four per run)
    if few:
        log.warning("Frechet distances from fewer samples than embedding dimensions (%s): each covariance has a "
                    "lower rank than its dimension, so each distance carries a large bias that depends on the number "
                    "of samples; compare only numbers computed on the same number of clips",
                    "; ".join(sorted({f"{m.what}: {m.n} x {m.d}-d" for m in few})))
    for x in w:  # everything else goes on as usual
        if not issubclass(x.category, M.FewSamplesWarning):
            warnings.warn_explicit(x.message, x.category, x.filename, x.lineno)

    metric_card = cards.metric_descriptions(cfg, which, bb_cards.get("clap", {}).get("weights_sha256", "not computed"))
    audio_card = cards.audio_description(cfg.crop, CROPS[cfg.crop], bb_cards)
    ref_card = {**(ref_card or {}), "n_clips": n, "set_sha256": set_hash(ref, captions)}
    gen_card = {**(gen_card or {}), "n_clips": n, "set_sha256": set_hash(gen)}
    card = cards.build(bb_cards, audio_card, metric_card, ref_card, gen_card, n, _device(cfg.device))
    # a gen_dir= evaluation generated nothing: its generation keys (defaults) would read as the clips' settings
    config = {k: v for k, v in to_dict(cfg).items() if cfg.ckpt or k not in GENERATION_KEYS}
    return {"metrics": values, "card": card, "config": config, "warnings": caught, "cache": cache_stats,
            "per_clip": per_clip}


def reward_equals_metric(reward: dict, models: dict[str, Backbone], computed: list[str]) -> list[str]:
    """The metrics whose backbone is the very model a stage-2 run was aligned with (``reward``, as
    ``reward_model`` gives it): same model name and same weights (sha256, or the same random seed)."""
    return [m for m in computed if reward and (reward.get("name"), reward.get("weights_sha256")) ==
            (models[ROLE_OF[m]].name, models[ROLE_OF[m]].weights_sha256)]


def evaluate(cfg: EvalConfig) -> dict:
    """Read the reference, generate with ``ckpt`` (or read ``gen_dir``), evaluate, write results.json.

    A run that cannot generate gets results.json with status "itg" and the reason (and no metrics)."""
    if bool(cfg.ckpt) == bool(cfg.gen_dir) or not cfg.ref:
        raise ConfigError("pass ref=MANIFEST (id,audio,caption; or ref=demo) and exactly one of ckpt=RUN_DIR "
                          "(generate, then evaluate) or gen_dir=FOLDER (generated <id>.wav files)")
    if cfg.ref == "demo":  # the embedded demo set's test split
        from siren.data.demo import demo_set

        ref = str(demo_set().test)
    else:
        ref = cfg.ref
    items, ref_card = load_reference(cfg, ref)  # a bad manifest is named before any weights are looked for
    if len(items) < 2:
        raise EvalError(f"the reference set has {len(items)} clip(s); at least 2 are needed")
    if cfg.ckpt:  # a wrong ckpt= is named before its default out=<ckpt>/eval is checked or made
        read_run_config(cfg.ckpt)
    out = output_dir(cfg)
    if cfg.gen_dir and out.suffix == ".wav" and out.resolve().parent == Path(cfg.gen_dir).resolve():
        raise ConfigError(f"out={cfg.out}: a folder named like a clip in gen_dir={cfg.gen_dir} would be read as one "
                          f"by every later evaluation of it; give another out=")
    check_folder(out, "out")
    # a wrong gen_dir= made <gen_dir>_eval/, or set an earlier results.json aside, before it was named
    matched = match_generated(cfg.gen_dir, [it.id for it in items], subset=bool(cfg.subset)) if cfg.gen_dir else None
    # two evaluations into one folder each skipped the clips the other had written and scored the mix as its own
    with hold(out / "eval.lock", f"an evaluation of {cfg.ckpt or cfg.gen_dir}",
              "wait for it to finish, or give this one another out="):
        return _evaluate_in(out, cfg, items, ref_card, matched)


def _evaluate_in(out: Path, cfg: EvalConfig, items: list, ref_card: dict,
                 matched: tuple[dict[str, Path], int] | None) -> dict:
    # an earlier evaluation's results are kept beside, not left as this one's: a run that fails here must not leave
    # them in results.json, read as its own. Set aside once this one starts: a metric network's missing weights, or
    # clips in gen/ made otherwise (generate_set's check), are refused with the folder as it was
    models = backbones(cfg)

    def set_aside() -> None:
        if (out / "results.json").is_file():
            os.replace(out / "results.json", out / "results.previous.json")

    if not cfg.ckpt:
        set_aside()
    gen_card, gen_dir = {}, cfg.gen_dir
    if cfg.ckpt:
        from eval.generate import CannotGenerate, generate_set

        gen_dir = str(out / "gen")
        try:
            gen_card = generate_set(cfg.ckpt, [it.id for it in items], [it.caption for it in items], gen_dir,
                                    seconds=cfg.seconds, batch_size=cfg.gen_batch_size, seed=cfg.gen_seed,
                                    sample=cfg.sample, candidates=cfg.candidates,
                                    clap=models["clap"].net if "clap" in models else None, device=_device(cfg.device),
                                    started=set_aside)
            gen_card["sample_source"] = SAMPLING_SOURCE
        except CannotGenerate as e:
            set_aside()
            results = {"status": "itg", "reason": str(e), "metrics": {}, "config": to_dict(cfg)}
            write_json(out / "results.json", results, durable=True)
            return results
    gen_paths, left_out = matched or match_generated(gen_dir, [it.id for it in items], subset=bool(cfg.subset))
    if not cfg.ckpt:  # clips this harness generated carry their record: the card says what made them
        from eval.generate import record_card

        gen_card = record_card(Path(gen_dir), gen_paths)
    if left_out:
        gen_card["left_out"] = f"{left_out} clip(s) of {gen_dir} outside subset={cfg.subset}"
    clips, errors = {}, []
    for what, paths in [("reference", {it.id: it.audio for it in items}), ("generated", gen_paths)]:
        try:
            clips[what] = load_clips(paths, cfg.crop, what)
        except BadAudioError as e:
            errors.append(str(e))
    if errors:
        raise BadAudioError("\n".join(errors))
    results = evaluate_sets(clips["generated"], clips["reference"], [it.caption for it in items], cfg, ref_card,
                            {"dir": str(Path(gen_dir).resolve()), **gen_card}, models)
    # a metric's own checkpoint steered the clips: say so on the card and next to that metric; for a gen_dir= folder
    # this harness generated, from its record (the same clips got the mark only when made by ckpt=)
    run_dir = cfg.ckpt or gen_card.get("run_dir")
    if run_dir:
        computed = results["card"]["metrics"]["computed"]
        # a record before 2026-12-08 has no reward_model: read from its run, where that is still there
        reward = gen_card["reward_model"] if "reward_model" in gen_card else reward_model(run_dir)
        if "reward_model" not in gen_card and not Path(run_dir).is_dir():
            log.warning("%s: its generation.json (before 2026-12-08) does not say which reward model %s was aligned "
                        "with, and that run is not there: no metric is marked 'reward = metric'", cfg.gen_dir, run_dir)
        notes = {m: cards.REWARD_NOTE for m in reward_equals_metric(reward, models, computed)}
        n = cfg.candidates if cfg.ckpt else gen_card.get("candidates", 1)
        # reject sampling scores with the CLAP metric's model (ckpt=), or with the recorded scorer
        if n > 1 and "clap" in computed and (cfg.ckpt or gen_card.get("scorer") == models["clap"].net.id):
            picked = cards.SELECTION_REASON.format(n=n)
            notes["clap"] = f"{notes['clap']}; and {picked}" if "clap" in notes else f"reward = metric: {picked}"
        results["card"]["reward_equals_metric"] = sorted(notes)
        for m, why in notes.items():
            results["card"]["metrics"][m]["reward_equals_metric"] = why
    results["status"] = "ok"
    write_json(out / "results.json", results, durable=True)
    return results


def evaluate_run(run_dir: str, ref: str, out: str, weights: str, overrides: list[str] = (), gen_dir: str = "") -> dict:
    """The ablation grid's eval step: ``ckpt=run_dir`` (or ``gen_dir=``: clips made otherwise, e.g. the
    calibration rows) with the cell's eval.* keys; returns the status."""
    source = f"gen_dir={gen_dir}" if gen_dir else f"ckpt={run_dir}"
    cfg = load_config(EvalConfig, [source, f"ref={ref}", f"out={out}", f"weights={weights}", *overrides])
    res = evaluate(cfg)
    return {"status": res["status"], "reason": res.get("reason", ""), "metrics": res["metrics"]}


def output_dir(cfg: EvalConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.ckpt:
        return Path(cfg.ckpt) / "eval"
    g = Path(cfg.gen_dir).resolve()
    return g.parent / f"{g.name}_eval"


def _main(argv: list[str]) -> int:
    cfg = load_config(EvalConfig, argv)
    results = evaluate(cfg)
    name = cfg.name or Path(cfg.ckpt or cfg.gen_dir).resolve().name
    if results["status"] == "itg":
        print(f"{name}: itg (inability to generate): {results['reason']}")
    else:
        print(cards.table([(name, results["metrics"])], results["card"]))
    print(f"results: {output_dir(cfg) / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with one error line for bad input)."""
    from siren import cli

    return cli.call(_main, argv, EvalConfig, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
