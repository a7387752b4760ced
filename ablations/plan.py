"""Planning a grid run: the launcher's config, the grid's cells at a scale, and the graph of jobs
that make them (prepare -> train expert_0..K-1 -> [align] -> eval), each job keyed so that a cell
or a stage shared by several rows or tables runs once. Nothing here runs or submits anything.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ablations import steps
from ablations.executors import KINDS, load_profile
from ablations.grid import MANIFESTS, Grid, Row, cell_id, load_grid, pretrained_assets
from ablations.ledger import Job
from ablations.scales import resolve
from siren.config import check_numbers, given_once, load_config
from siren.errors import ConfigError, DataError, MissingWeightsError
from siren.io import check_folder, read_json, write_json

log = logging.getLogger(__name__)

ACTIONS = ("run", "status", "table", "cancel")


@dataclass
class RunConfig:
    grid: str = "table6"
    scale: str = "demo"
    executor: str = "local"  # local | slurm | debug
    profile: str = "local"  # slurm/profiles/<profile>.yaml (executor=slurm)
    action: str = "run"
    retry: bool = False
    rows: str = ""  # comma-separated row labels; empty = all
    out: str = "outputs"
    max_parallel: int = 2  # local executor: jobs at once
    warm: bool = True  # local executor: fork jobs from a process that imported torch once (ablations/warm.py)
    gpus: int = 0  # per training/alignment/eval job (scale=paper on a cluster: 1)
    cpus: int = 1  # per training/alignment/eval job (a profile may raise it); prepare takes 2
    mem_gb: float = 8  # per job (a profile may raise it)
    train_timeout_min: int = 60 * 24
    prepare_shards: int = 1  # > 1: a user's training set is encoded by this many jobs (one job array), then indexed
    calibration: str = "auto"  # oracle + chance rows: auto (on at scale=demo) | true | false
    set: dict = field(default_factory=dict)  # cell overrides, dotted keys

    def __post_init__(self):
        check_numbers(self, positive=("max_parallel", "cpus", "mem_gb", "train_timeout_min", "prepare_shards"),
                      nonneg=("gpus",))
        if self.gpus > 1:  # a grid job is one process: N GPUs were reserved and N - 1 sat idle
            raise ConfigError(f"gpus={self.gpus}: a grid job runs one process on one GPU; set gpus=1 (one expert on "
                              f"several GPUs: torchrun --nproc_per_node=N -m siren.train ..., outside the grid)")

    @property
    def root(self) -> Path:
        """Where this scale's results go: <out>/<scale>/{cells,data,stage1,calibration,jobs,logs,tables,figures}."""
        return Path(self.out) / self.scale

    @property
    def calibrated(self) -> bool:
        return self.calibration == "true" or (self.calibration == "auto" and self.scale == "demo")


def pick_rows(text: str, labels: list[str]) -> tuple[set[str], list[str]]:
    """``rows=LABEL,LABEL`` read against the grid's labels -> (the rows named, the parts that name none). A
    label may hold a comma itself (Table 7's "Anti-Causal, 1 model"), so the longest run of parts that is a
    label wins."""
    parts, wanted, unknown, i = text.split(","), set(), [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]) in labels), None)
        if j is None:
            unknown += [parts[i]] if parts[i] else []
            i += 1
        else:
            wanted.add(",".join(parts[i:j]))
            i = j
    return wanted, unknown


@dataclass
class Cell:
    id: str
    dir: Path
    cfg: dict
    rows: list[Row]

    @property
    def n_experts(self) -> int:
        if self.cfg.get("model.family") == "continuous":
            return 1
        return int(self.cfg["model.distribution"].split("-")[0])


def parse(argv: list[str]) -> RunConfig:
    bare = [a for a in argv if a.startswith("set.") and "=" not in a]
    if bare:  # it was dropped without a word, and the grid ran with the default
        raise ConfigError(f"{bare[0]}: expected set.KEY=VALUE")
    sets = {k[4:]: v for k, v in given_once([a for a in argv if a.startswith("set.")])}
    steps.refuse_step_keys(sets)  # here, not only per cell: one at the stage's default is dropped as it resolves
    cfg = load_config(RunConfig, [a for a in argv if not a.startswith("set.")])
    cfg.set = sets
    if cfg.calibration not in ("auto", "true", "false"):
        raise ConfigError(f"calibration must be auto, true or false, got {cfg.calibration!r}")
    if cfg.action not in ACTIONS:
        raise ConfigError(f"unknown action '{cfg.action}'; valid: {', '.join(ACTIONS)}")
    if cfg.executor not in KINDS:
        raise ConfigError(f"unknown executor '{cfg.executor}'; valid: {', '.join(KINDS)}")
    if cfg.executor == "slurm":
        load_profile(cfg.profile)  # a missing profile names the available ones before anything runs
    check_folder(cfg.out, "out")  # action=status and table write there too
    check_folder(cfg.root, "out")  # <out>/<scale>: a file there was a NotADirectoryError
    grid = load_grid(cfg.grid)  # names the valid grids if this one does not exist
    labels = [r.label for r in grid.rows]
    unknown = pick_rows(cfg.rows, labels)[1]
    if unknown:
        raise ConfigError(f"rows {unknown} are not in {cfg.grid}; its rows: {', '.join(labels)}")
    return cfg


def cells_of(grid: Grid, cfg: RunConfig) -> list[Cell]:
    """The grid's cells at ``cfg.scale`` (rows that resolve to the same config share one cell); every
    row's keys are validated by the stages' own config schemas before anything is submitted."""
    cells: dict[str, Cell] = {}
    wanted = pick_rows(cfg.rows, [r.label for r in grid.rows])[0]
    for row in grid.rows:
        if row.cell is None or (wanted and row.label not in wanted):
            continue
        resolved = resolve(row.cell, cfg.scale, cfg.set)
        steps.validate(resolved, f"{grid.name} row {row.label!r}")
        if "rl.method" not in resolve(row.cell, cfg.scale, {}):
            # Stage-2 overrides do nothing to a row without stage 2, so they stay out of its identity:
            # `set.rl.steps=100` on Table 4 re-runs its "+ RL Align" row, not the evaluations beside it, and
            # `set.rl.method=dpo` aligns no row the table labels unaligned. (The scale's own rl.* defaults stay
            # in, as before, so cells already made keep their ids.)
            resolved = resolve(row.cell, cfg.scale, {k: v for k, v in cfg.set.items() if not k.startswith("rl.")})
        cid = cell_id(resolved)
        cells.setdefault(cid, Cell(cid, cfg.root / "cells" / cid, resolved, [])).rows.append(row)
    for cell in cells.values():  # `set.rl.n=1 set.rl.align=anti_causal` made Table 7 one cell, said nowhere
        if cfg.set and len({cell_id(resolve(r.cell, cfg.scale, {})) for r in cell.rows}) > 1:
            log.warning("%s: rows %s are one cell under %s (the keys that tell them apart are set for all): each "
                        "shows that one run's numbers", grid.name, ", ".join(repr(r.label) for r in cell.rows),
                        " ".join(f"set.{k}={v}" for k, v in cfg.set.items()))
    unused = sorted(k for k in cfg.set if k.startswith("rl."))
    if unused and not any("rl.method" in c.cfg for c in cells.values()):
        log.warning("%s ignored: no row of %s runs stage 2", ", ".join(f"set.{k}" for k in unused), grid.name)
    return list(cells.values())


# A user's test set, eval subset and RL prompts are read by evaluation and stage 2 only (prepare reads the training
# manifest; the demo source makes both splits from its clip counts): keeping them out of the data and stage-1 ids
# means a new subset re-evaluates the trained models instead of preparing and training them all again.
NOT_TRAINING = ("data.test", "data.prompts", "data.subset")


def _training_keys(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not (cfg["data.source"] == "manifest" and k in NOT_TRAINING)}


def _folder(parent: Path, keys: dict, former: dict) -> Path:
    """``parent/<id of keys>``; where only the folder of an id used before is there, that one: a grid made before
    goes on from its prepared data and trained models. Before 2026-12-06 the ids held every data key (``former``),
    before da29cc7 not the pretrained files' hashes (such a folder is not checked against the files: the index's
    codec id still is, at training)."""
    new = parent / cell_id(keys)
    if new.exists():
        return new
    for old in (parent / cell_id(keys, pretrained_files=False), parent / cell_id(former, pretrained_files=False)):
        if old.exists():
            return old
    return new


def _data_keys(cfg: dict, keep: tuple[str, ...] = ()) -> dict:
    """What prepare reads: the training data keys, the weights, and with appendix B's crop filter the crop length
    it scores (``keep``: data keys kept although prepare does not read them, as in the ids before 2026-12-06)."""
    keys = {k: v for k, v in cfg.items()
            if (k.startswith("data.") and (k in keep or k in _training_keys(cfg))) or k == "weights"}
    if float(cfg.get("train.crop_min_clap", 0)) > 0:  # steps.prepare_step: prepare crop_s=...
        keys["train.crop_s"] = cfg["train.crop_s"]
    return keys


def data_dir(cfg: dict, root: Path) -> Path:
    """Where a cell's data is prepared (its name is the data id, or the id it had before 2026-12-06)."""
    return _folder(root / "data", _data_keys(cfg), _data_keys(cfg, NOT_TRAINING))


def calibration_id(cfg: dict) -> str:
    """The calibration rows' key: the data config and the evaluation protocol they are scored by (``eval.*``,
    but the model's generation batch, which they do not use), so `set.eval.seconds=2` scores them anew too."""
    return cell_id({k: v for k, v in cfg.items()
                    if k == "weights" or (k.startswith(("data.", "eval.")) and k != "eval.gen_batch_size")})


def stage1_dir(cell: Cell, run: RunConfig) -> Path:
    """Stage 1 is keyed by the config without stage-2, eval and test-data keys, so every alignment variant of a
    model (Table 7, Figure 5), the unaligned cell and its evaluations on other test sets share one trained run."""
    former = {k: v for k, v in cell.cfg.items() if not k.startswith(("rl.", "eval."))}
    return _folder(run.root / "stage1", _training_keys(former), former)


def check_manifests(cells: list[Cell]) -> None:
    """Before anything is submitted, every manifest a ``data.source=manifest`` cell names is a file: a typo in
    ``data.test`` would otherwise surface in the eval job, after every expert had trained. The paths are
    checked as this launcher sees them; the jobs read the same paths (a cluster's shared filesystem)."""
    absent = sorted({f"set.{k}={c.cfg[k]}" for c in cells if c.cfg["data.source"] == "manifest" for k in MANIFESTS
                     if c.cfg.get(k) and not Path(c.cfg[k]).is_file()})
    if absent:
        raise ConfigError(f"no such file: {', '.join(absent)}; give the manifests' paths as the jobs will see them "
                          "(action=table writes the tables of finished jobs without reading them)")


METRIC_ASSETS = {"panns_cnn14_16k": {"fd", "kl", "isc"}, "vggish": {"fad"}}  # read only by these metrics


def check_assets(cells: list[Cell]) -> None:
    """Before anything is submitted, every pretrained file a ``weights=pretrained`` cell's jobs read is in the
    assets cache: each job would otherwise fail on its node, after the queue wait, and the cells' ids (which hash
    the files) would name a missing file rather than the one a later prefetch brings."""
    from siren import assets

    needed = sorted({n for c in cells if c.cfg.get("weights") == "pretrained" for n in pretrained_assets(c.cfg)
                     if n not in METRIC_ASSETS or METRIC_ASSETS[n] & set(steps.metrics_of(c.cfg))})
    missing = [n for n in needed if not assets.present(n)]
    if missing:
        raise MissingWeightsError(
            f"weights=pretrained: {len(missing)} file(s) the jobs read are not in the assets cache "
            f"{assets.cache_dir()}: " + ", ".join(f"{n} ({assets.ASSETS[n].filename})" for n in missing)
            + f". On a machine with internet run `{assets.PREFETCH} {' '.join(missing)}` (SIREN_CACHE on storage "
            "the compute nodes share), or copy the files there; weights=demo runs on the demo weights offline")


def check_sources(jobs: list[Job]) -> None:
    """Before anything is submitted, the audio of every finished prepare job is still the audio it encoded, and
    that of every finished evaluation the reference audio it scored: a file replaced under the same path would
    otherwise leave the former audio's codes, and the models trained and evaluated on them, or the former
    references' scores, counted as this data's (cells are keyed by the manifests' contents, not the audio's)."""
    from siren.data.index import changed_files, changed_sources

    for job in jobs:
        if job.fn is steps.prepare_step and job.kwargs.get("shard") is None and job.done.is_file():
            folder = job.done.parent
            changed, gone = [], []
            for index in sorted((folder / "splits").glob("*.json")):
                c, g = changed_sources(folder, index.stem)
                changed, gone = changed + c, gone + g
            what, kept = "prepared", "training goes on from their prepared codes"
            cost = "The codes there, and every model trained or evaluated on them, are of the former audio"
        elif job.fn in (steps.eval_step, steps.calibration_step) and job.done.is_file():
            folder = Path(job.kwargs["out"])
            path = folder / steps.REFERENCES  # evaluations before 2026-12-07 wrote none: not checked
            records = read_json(path, "delete it to skip this check") if path.is_file() else []
            changed, gone, restated = changed_files(records)
            if restated:  # the same bytes (a copy, a restore): not hashed again next time
                write_json(path, records)
            what, kept = "scored as references", "the results stand"
            cost = "The results there are of the former audio"
        else:
            continue
        if gone:  # moved or deleted (a quota, a moved out= folder)
            log.warning("%s: %d audio file(s) %s there are no longer where they were (e.g. %s); %s", folder,
                        len(gone), what, gone[0], kept)
        if not changed:
            continue
        demo = job.kwargs["cfg"]["data.source"] == "demo"
        fix = ("the demo set is generated: run the grid with another out= to start from a fresh one" if demo else
               "to use the new audio, copy the manifest to a new name and point set.data.train (and set.data.test) "
               "at it: new cells, trained afresh" if what == "prepared" else
               "to score the new audio, copy the test manifest to a new name and point set.data.test at it: the "
               "same models, evaluated afresh")
        raise DataError(f"{folder}: {len(changed)} audio file(s) changed since they were {what}, e.g. "
                        f"{'; '.join(changed[:3])}. {cost}. Restore the files to keep these results; {fix}.")


def data_paths(cfg: dict, prepared: Path) -> tuple[str, str, str | None]:
    """(eval reference manifest, RL prompts, eval subset) of a cell."""
    if cfg["data.source"] == "demo":
        from siren.data.demo import DemoSet

        demo = DemoSet.at(prepared / "demo_source")  # made by prepare (and the calibration rows' source job)
        return str(demo.test), str(demo.train), None  # every test clip (90): ISC over 10 splits needs them
    missing = [k for k in ("data.train", "data.test", "data.prompts") if k not in cfg]
    if missing:
        raise ConfigError(f"data.source={cfg['data.source']} (scale=paper's) needs your manifests: "
                          f"{', '.join(f'set.{k}=FILE' for k in missing)} "
                          "(id,audio,caption CSV/JSONL: training set, AudioCaps test set, RL prompts)")
    return cfg["data.test"], cfg["data.prompts"], cfg.get("data.subset")


def plan(cells: list[Cell], run: RunConfig) -> list[Job]:
    """prepare (once per data config) -> train expert_0..K-1 (once per stage-1 config) -> [align] -> eval."""
    jobs: dict[str, Job] = {}
    res = dict(gpus=run.gpus, cpus=run.cpus, mem_gb=run.mem_gb)
    for cell in cells:
        prepared, rows = data_dir(cell.cfg, run.root), ", ".join(r.label for r in cell.rows)
        did = prepared.name
        ref, prompts, subset = data_paths(cell.cfg, prepared)
        prep = f"data-{did}"
        # prepare and latents run the codec over the whole training set: on the GPU the other jobs get (2.5 s a
        # 10 s clip on 2 CPU cores: 100k clips were ~70 h, over the requeues' ceiling at the paper's sizes)
        # a user's training set in shards (the demo set is made by prepare itself: one job); the index job keeps
        # the key and marker of the one prepare job, so a grid prepared either way goes on from its data
        sharded = run.prepare_shards > 1 and cell.cfg["data.source"] != "demo" and \
            not (prepared / "prepared.done").is_file()
        n = run.prepare_shards if sharded else 1
        # N in the key as in the marker: another prepare_shards= is other jobs, not a ledger record of the former
        parts = [f"{prep}/shard_{i}_of_{n}" for i in range(n)] if sharded else []
        for i, key in enumerate(parts):
            jobs.setdefault(key, Job(key, steps.prepare_step, dict(data_dir=str(prepared), cfg=cell.cfg, shard=i,
                                                                 num_shards=n),
                                     prepared / f"shard_{i}_of_{n}.done", gpus=run.gpus, cpus=2, mem_gb=run.mem_gb,
                                     timeout_min=24 * 60, array=f"{prep}/shards"))
        jobs.setdefault(prep, Job(prep, steps.prepare_step,
                                  dict(data_dir=str(prepared), cfg=cell.cfg, **({"num_shards": n} if sharded else {})),
                                  prepared / "prepared.done", deps=parts, gpus=0 if sharded else run.gpus, cpus=2,
                                  mem_gb=run.mem_gb, timeout_min=24 * 60, output=prepared / "splits", recheck=True))
        stage1 = stage1_dir(cell, run)
        trains = [f"stage1-{stage1.name}/expert_{k}" for k in range(cell.n_experts)]
        before_train = [prep]
        if cell.cfg.get("model.family") == "continuous":  # its tokens: latents + the fitted PCA of this width
            dim = steps.continuous_config(cell.cfg).token_dim
            before_train = [f"latents-{did}-{dim}"]
            jobs.setdefault(before_train[0], Job(before_train[0], steps.latents_step,
                                                 dict(data_dir=str(prepared), cfg=cell.cfg, dim=dim),
                                                 prepared / f"latents-{dim}.done", deps=[prep], gpus=run.gpus, cpus=2,
                                                 mem_gb=run.mem_gb, timeout_min=24 * 60,
                                                 output=prepared / "latents" / f"pca{dim}.json", recheck=True))
        for k, key in enumerate(trains):
            jobs.setdefault(key, Job(key, steps.train_step, dict(cfg=cell.cfg, run_dir=str(stage1),
                                                                 data_dir=str(prepared), expert=k),
                                     stage1 / f"expert_{k}.done", deps=before_train,
                                     timeout_min=run.train_timeout_min, output=stage1 / f"expert_{k}",
                                     array=f"stage1-{stage1.name}", **res))
        model_dir, before_eval = stage1, trains
        if "rl.method" in cell.cfg:
            model_dir, key = cell.dir / "aligned", f"{cell.id}/align"
            jobs[key] = Job(key, steps.align_step, dict(cfg=cell.cfg, stage1_dir=str(stage1), out=str(model_dir),
                                                        prompts=prompts),
                            cell.dir / "aligned.done", deps=trains, timeout_min=run.train_timeout_min, output=model_dir,
                            rows=rows, **res)
            before_eval = [key]
        key = f"{cell.id}/eval"
        ecfg = {**cell.cfg, "eval.subset": subset} if subset else cell.cfg
        jobs[key] = Job(key, steps.eval_step,
                        dict(cfg=ecfg, run_dir=str(model_dir), ref=ref, out=str(cell.dir / "eval"),
                             data_dir=str(prepared)),
                        cell.dir / "eval.done", deps=before_eval, timeout_min=12 * 60, rows=rows,
                        output=cell.dir / "eval" / "results.json", **res)
        # Calibration rows, once per data config (codec, test set). They read only the test clips (or a user's
        # test manifest) and the codec, so they need not wait for prepare: at demo scale a job of seconds writes
        # the demo set for them, beside prepare, which writes the same files itself (siren.data.demo: identical
        # bytes, atomic).
        # Each row after the first waits for the one before: the reference embeddings are then cached, not
        # computed by two jobs at once (~35 s CPU).
        source = [f"source-{did}"] if run.calibrated and cell.cfg["data.source"] == "demo" else []
        for key in source:
            jobs.setdefault(key, Job(key, steps.source_step, dict(data_dir=str(prepared), cfg=cell.cfg),
                                     prepared / "demo_source.done", mem_gb=run.mem_gb))
        calib_deps = source
        for kind in steps.CALIBRATIONS if run.calibrated else ():
            key, folder = f"calib-{calibration_id(cell.cfg)}/{kind}", calibration_dir(run, cell, kind)
            jobs.setdefault(key, Job(key, steps.calibration_step, dict(cfg=cell.cfg, kind=kind, ref=ref, subset=subset,
                                                                       out=str(folder)),
                                     folder.with_suffix(".done"), deps=calib_deps, timeout_min=12 * 60,
                                     output=folder / "results.json", **res))
            calib_deps = [*source, key]
    return list(jobs.values())


def calibration_dir(run: RunConfig, cell: Cell, kind: str) -> Path:
    """Where a calibration row of a cell's data config is evaluated (shared by every cell on that data)."""
    return run.root / "calibration" / calibration_id(cell.cfg) / kind
