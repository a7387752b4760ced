"""The steps of a cell, each a module-level function that a submitit job runs (so it pickles by
reference). Each takes the cell's resolved dotted config and calls the stage's own entry point
with the stage's own keys: a grid run is exactly the commands a user would type by hand."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from siren.errors import ConfigError, DataError
from siren.runtime import EXIT_PREEMPTED


class Preempted(RuntimeError):
    """A stage stopped on SIGUSR2/SIGTERM after checkpointing; running the step again resumes it."""


def _keys(cfg: Mapping[str, Any], prefix: str, strip: bool = True) -> list[str]:
    """key=value args of the keys under ``prefix`` (without it when ``strip``)."""
    return [f"{k[len(prefix):] if strip else k}={v}" for k, v in cfg.items() if k.startswith(prefix)]


def _weights(cfg: Mapping[str, Any], *parts: str) -> list[str]:
    return [f"{p}.weights={cfg['weights']}" for p in parts]


def stage1_args(cfg: Mapping[str, Any]) -> list[str]:
    """siren.train keys of a cell: the model preset first (so explicit model keys override it). A
    ``model.family=continuous`` cell's model keys are the continuous group's (``continuous.*``)."""
    model = {k: v for k, v in cfg.items() if k.startswith("model.") and k not in ("model.scale", "model.arch")}
    if model.pop("model.family", "discrete") == "continuous":
        return [f"scale={cfg['model.scale']}", "family=continuous",
                *(f"continuous.{k[len('model.'):]}={v}" for k, v in model.items()),
                *_keys(cfg, "train.", strip=False), *_weights(cfg, "codec")]
    return [f"scale={cfg['model.scale']}", f"arch={cfg.get('model.arch', 'official')}", *_keys(model, "", strip=False),
            *_keys(cfg, "train.", strip=False),
            *_weights(cfg, "codec")]


def model_config(cfg: Mapping[str, Any]):
    """The cell's ModelConfig (its preset, then its model keys), as siren.train builds it."""
    from siren.config import load_config
    from siren.model.config import ModelConfig, presets

    model = {k: v for k, v in cfg.items() if k.startswith("model.") and k not in ("model.scale", "model.arch")}
    return load_config(ModelConfig, [f"scale={cfg['model.scale']}", f"arch={cfg.get('model.arch', 'official')}",
                                     *_keys(model, "model.")], presets())


def continuous_config(cfg: Mapping[str, Any]):
    """A ``model.family=continuous`` cell's ContinuousConfig, as siren.train builds it."""
    from siren.train import parse

    return parse(stage1_args(cfg)).continuous


# data.demo_train / data.demo_test: clips per class of the embedded demo set (data.source=demo)
MANIFEST_KEYS = ("data.train", "data.test", "data.prompts", "data.subset")  # data.source=manifest's
DATA_KEYS = ("data.source", *MANIFEST_KEYS, "data.demo_train", "data.demo_test")


# Keys each step sets itself: a cell's rl.out= or eval.ref= came after them and won, so results went outside the
# cell's folder and the table looked for them where they were not, or another run was aligned under the row.
STEP_KEYS = {"rl.": ("run_dir", "out", "prompts", "codec.weights", "text.weights", "reward.weights"),
             "eval.": ("ckpt", "gen_dir", "ref", "out", "weights", "subset")}


def metrics_of(cfg: Mapping[str, Any]) -> list[str]:
    """The metrics a cell's evaluation computes (its ``eval.metrics``, or the evaluation's default)."""
    from eval.config import EvalConfig, metric_list
    from siren.config import load_config

    return metric_list(load_config(EvalConfig, _keys(cfg, "eval.")))


def refuse_step_keys(keys) -> None:
    """A cell key that a step sets itself (STEP_KEYS) is an error naming what to use instead."""
    taken = [p + k for p, names in STEP_KEYS.items() for k in names if p + k in keys]
    if taken:
        raise ConfigError(f"{', '.join(taken)}: set by the grid for each cell (its folders, data and weights); "
                          f"use out=, data.test= / data.prompts= / data.subset= or weights= instead")


def validate(cfg: Mapping[str, Any], where: str) -> None:
    """Every key of a cell parsed by the schema of the stage that takes it (unknown keys, bad types
    and out-of-range values are errors now, not inside a job); nothing is built."""
    from eval.config import EvalConfig, max_is_splits, metric_list
    from siren.config import load_config
    from siren.data.prepare_config import PrepareConfig
    from siren.rl.config import parse as align_parse
    from siren.rl.rollout import trainable_experts
    from siren.train import parse as stage1_parse

    other = [k for k in cfg
             if not k.startswith(("model.", "train.", "rl.", "eval.")) and k not in (*DATA_KEYS, "weights")]
    try:
        if other:
            raise ConfigError(f"unknown cell key(s) {other}; cell keys start with model., train., rl., eval. or "
                              f"are one of {', '.join(DATA_KEYS)}, weights")
        refuse_step_keys(cfg)
        if cfg["weights"] not in ("pretrained", "random", "demo"):
            raise ConfigError(f"weights must be pretrained, demo or random, got {cfg['weights']!r}")
        if cfg["data.source"] not in ("demo", "manifest"):
            raise ConfigError(f"data.source must be demo or manifest, got {cfg['data.source']!r}")
        # manifests given to the demo source: ignored by every step (it evaluates on the embedded test split), yet
        # part of the cells' ids, so everything was prepared and trained again for a table of the demo set
        unread = [k for k in MANIFEST_KEYS if k in cfg] if cfg["data.source"] == "demo" else []
        if unread:
            it = "it" if len(unread) == 1 else "them"
            raise ConfigError(f"{', '.join(unread)}: data.source=demo does not read {it}; leave {it} out, or "
                              f"set.data.source=manifest (or scale=paper) to read your manifests")
        if cfg["data.source"] == "demo":  # the clip counts go to prepare: its schema checks them
            load_config(PrepareConfig, [f"{k}={cfg['data.' + k]}" for k in ("demo_train", "demo_test")])
        stage1 = stage1_parse(stage1_args(cfg))
        if any(k.startswith("rl.") for k in cfg):
            align = align_parse(["run_dir=-", "out=--", *_keys(cfg, "rl.")])
            # rl.n=7 on 6-2 failed in the align job, after stage 1 trained; a row without stage 2 never reads it
            if stage1.family == "discrete" and "rl.method" in cfg:
                trainable_experts(stage1.model.n_experts, align.align, align.n)
        ecfg = load_config(EvalConfig, _keys(cfg, "eval."))
        if cfg["data.source"] == "demo" and "isc" in metric_list(ecfg):  # the eval jobs' own check, after training
            from siren.data.demo import CLASSES

            n = len(CLASSES) * int(cfg["data.demo_test"])
            if ecfg.is_splits > max_is_splits(n):
                raise ConfigError(f"data.demo_test={cfg['data.demo_test']} gives {n} test clips: IS with "
                                  f"eval.is_splits={ecfg.is_splits} needs 2 a split; set set.eval.is_splits=K "
                                  f"(K <= {max(1, max_is_splits(n))}) or more test clips")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e} (set.KEY=VALUE overrides reach every cell)") from None


def _check(rc: int, what: str) -> None:
    if rc == EXIT_PREEMPTED:
        raise Preempted(f"{what} stopped on a signal after checkpointing; run the grid again to resume")
    if rc != 0:
        raise RuntimeError(f"{what} exited with status {rc}")


def source_step(data_dir: str, cfg: Mapping[str, Any]) -> dict:
    """The embedded demo set's clips and manifests under ``data_dir/demo_source`` (siren.data.demo, seconds),
    for the calibration rows, which read only these and the codec: they then run beside prepare (ablations.plan)."""
    from siren.data.demo import demo_set

    demo = demo_set(Path(data_dir) / "demo_source", n_train=cfg["data.demo_train"], n_test=cfg["data.demo_test"])
    return {"train": str(demo.train), "test": str(demo.test)}


def prepare_step(data_dir: str, cfg: Mapping[str, Any], shard: int | None = None, num_shards: int = 1) -> dict:
    """siren.data.prepare of the training data: all of it (``num_shards=1``), or one of ``num_shards`` shard jobs
    (``shard=i``), or, after them, their index (``shard=None``)."""
    from siren.data import prepare

    if cfg["data.source"] == "demo":
        source = ["manifest=demo", f"demo_train={cfg['data.demo_train']}", f"demo_test={cfg['data.demo_test']}"]
    else:
        source = [f"manifest={cfg['data.train']}", "split=train"]  # what training reads, whatever the file's name
    crops = [f"crop_s={cfg['train.crop_s']}"] if float(cfg.get("train.crop_min_clap", 0)) > 0 else []  # appendix B
    sharding = [] if num_shards == 1 else [f"num_shards={num_shards}",
                                           f"shard={shard}" if shard is not None else "step=index"]
    prepare.run(prepare.parse([*source, f"out={data_dir}", *_weights(cfg, "codec", "text"), *crops, *sharding]))
    return {"data_dir": data_dir, "shard": shard}


def latents_step(data_dir: str, cfg: Mapping[str, Any], dim: int) -> dict:
    """Continuous tokens of width ``dim`` for a prepared directory (siren.data.latents)."""
    from siren.data.latents import main as latents_main

    _check(latents_main([f"data={data_dir}", f"dim={dim}", *_weights(cfg, "codec")]), f"latents of {data_dir}")
    return {"data_dir": data_dir, "dim": dim}


def train_step(cfg: Mapping[str, Any], run_dir: str, data_dir: str, expert: int) -> dict:
    from siren.train import main as train_main

    _check(train_main([*stage1_args(cfg), f"run_dir={run_dir}", f"expert={expert}", f"data_dir={data_dir}"]),
           f"training expert {expert} of {run_dir}")
    return {"run_dir": run_dir, "expert": expert}


def align_step(cfg: Mapping[str, Any], stage1_dir: str, out: str, prompts: str) -> dict:
    from siren.rl.alignment import main as rl_main

    args = [f"run_dir={stage1_dir}", f"out={out}", f"prompts={prompts}", *_keys(cfg, "rl."),
            *_weights(cfg, "codec", "text", "reward")]
    _check(rl_main(args), f"stage-2 alignment of {stage1_dir}")
    return {"run_dir": out}


def eval_step(cfg: Mapping[str, Any], run_dir: str, ref: str, out: str, data_dir: str = "") -> dict:
    """Generate for every reference caption, score, write results.json; a model that cannot generate
    (non-finite logits, collapse) is recorded as itg with the reason, as the paper prints it. First, no test
    clip may be a clip the model trained on (``data_dir``'s train split)."""
    from eval.audiocaps import evaluate_run
    from siren.data.index import clips_shared_with_training

    test = record_references(ref, out)
    shared = clips_shared_with_training(data_dir, test) if data_dir else []
    if shared:
        raise DataError(f"{len(shared)} test clip(s) of {ref} have the same audio bytes as training items of "
                        f"{data_dir} (test id -> train id: {', '.join(f'{a} -> {b}' for a, b in shared[:5])}"
                        f"{' ...' if len(shared) > 5 else ''}): the model trained on them. Remove them from the "
                        f"training manifest (set.data.train) and run the grid again")

    return evaluate_run(run_dir=run_dir, ref=ref, out=out, weights=cfg["weights"],
                        overrides=[*_keys(cfg, "eval.")])


def record_references(ref: str, out: str) -> dict[str, dict]:
    """The reference clips' files as this evaluation reads them (sha256 and version, ``<out>/references.json``):
    a grid run again checks them (``ablations.plan.check_sources``), since a finished evaluation is not redone
    and would otherwise stand for audio no longer there under those paths."""
    from siren.data.index import reference_sources
    from siren.io import write_json

    test = reference_sources(ref)
    write_json(Path(out) / REFERENCES, sorted({r["source"]: r for r in test.values()}.values(),
                                             key=lambda r: r["source"]))
    return test


REFERENCES = "references.json"


def result_path(cell_dir: Path) -> Path:
    return Path(cell_dir) / "eval" / "results.json"


CALIBRATIONS = ("oracle", "chance")


def calibration_step(cfg: Mapping[str, Any], kind: str, ref: str, out: str, subset: str | None = None) -> dict:
    """A table's calibration row, through the same eval protocol as the model rows: ``oracle`` = every
    reference clip resynthesised by the codec (encode -> decode: the codec's upper bound), ``chance`` =
    uniformly random codes of the generation length decoded by the same codec (a floor)."""
    import torch

    from eval.audiocaps import evaluate_run
    from eval.config import GENERATION_KEYS
    from eval.generate import RECORD, write_clip
    from eval.reference import select
    from siren.codec import CODEBOOK_SIZE, FRAME_RATE, N_LAYERS, CodecConfig
    from siren.data.audio import load_audio
    from siren.data.manifest import child_path, read_manifest
    from siren.demo_weights import mode_of
    from siren.frontends import build_codec
    from siren.io import atomic_path, write_json
    from siren.runtime import code_version, derive_seed

    if kind not in CALIBRATIONS:
        raise ConfigError(f"calibration kind must be one of {CALIBRATIONS}, got {kind!r}")
    items = select(read_manifest(ref, unique_ids=False), ref, subset=subset)  # a bad manifest before any weights
    record_references(ref, out)
    gen_dir = Path(out) / "gen"
    paths = [child_path(gen_dir, it.id, ".wav") for it in items]
    codec = build_codec(CodecConfig(weights=cfg["weights"]))
    n_frames = max(1, round(float(cfg.get("eval.seconds", 10.0)) * FRAME_RATE))
    g = torch.Generator().manual_seed(derive_seed(0, CALIBRATIONS.index(kind)))
    for it, path in zip(items, paths):
        if kind == "oracle":
            wav = codec.decode(codec.encode(load_audio(it.audio)))[0]
        else:
            wav = codec.decode(torch.randint(0, CODEBOOK_SIZE, (1, N_LAYERS, n_frames), generator=g))[0]
        with atomic_path(path) as tmp:
            write_clip(tmp, wav.float().cpu().numpy())
    # what made the clips, for their card (eval.generate.record_card): the codec's weights mode
    write_json(gen_dir / RECORD, {"made_by": f"calibration row {kind}", "code_version": code_version(),
                                  "frontends_weights": {"codec": mode_of(codec.weights_label)}})
    # the clips are made above: the keys of generating would be recorded as if the evaluation had applied them
    overrides = [*(k for k in _keys(cfg, "eval.") if k.split("=")[0].split(".")[0] not in GENERATION_KEYS),
                 *([f"subset={subset}"] if subset else [])]
    return evaluate_run(run_dir="", ref=ref, out=out, weights=cfg["weights"], overrides=overrides,
                        gen_dir=str(gen_dir))
