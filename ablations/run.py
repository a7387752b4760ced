"""Reproduce a paper table: `python ablations/run.py grid=table6`.

    grid=table3|table4|table5|table6|table7|figure5   which table (one file each in ablations/grids/)
    scale=demo|paper        demo: tiny models, embedded demo data, RANDOM weights (default)
    executor=local|slurm|debug   profile=NAME (slurm/profiles/NAME.yaml, for executor=slurm)
    action=run|status|table|cancel    retry=true resubmits failed jobs
    rows=LABEL,LABEL        only these rows of the grid (default: all)
    out=outputs             results: <out>/<scale>/{cells,data,jobs,logs,tables}
    set.KEY=VALUE           override any cell key for every cell (e.g. set.train.steps=100)

Running the same grid again submits nothing that is done or running. On SLURM, every job is
submitted at once, chained by afterok dependencies; the launcher does not wait.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python ablations/run.py` puts ablations/, not the repo, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations import pipeline, steps  # noqa: E402
from ablations.grid import Grid, Row, cell_id, load_grid  # noqa: E402
from ablations.pipeline import Job, JobState  # noqa: E402
from ablations.scales import resolve  # noqa: E402
from ablations.tables import Outcome, build_frame, write_tables  # noqa: E402
from siren import io  # noqa: E402
from siren.config import ConfigError, load_config  # noqa: E402
from siren.errors import SirenError  # noqa: E402

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
    gpus: int = 0  # per training/alignment/eval job (scale=paper on a cluster: 1)
    cpus: int = 1  # per training/alignment/eval job (a profile may raise it); prepare takes 2
    mem_gb: float = 8  # per job (a profile may raise it)
    train_timeout_min: int = 60 * 24
    set: dict = field(default_factory=dict)  # cell overrides, dotted keys


@dataclass
class Cell:
    id: str
    dir: Path
    cfg: dict
    rows: list[Row]


def parse(argv: list[str]) -> RunConfig:
    sets = {a.split("=", 1)[0][4:]: a.split("=", 1)[1] for a in argv if a.startswith("set.") and "=" in a}
    cfg = load_config(RunConfig, [a for a in argv if not a.startswith("set.")])
    cfg.set = sets
    if cfg.action not in ACTIONS:
        raise ConfigError(f"unknown action '{cfg.action}'; valid: {', '.join(ACTIONS)}")
    from ablations.executors import KINDS, load_profile

    if cfg.executor not in KINDS:
        raise ConfigError(f"unknown executor '{cfg.executor}'; valid: {', '.join(KINDS)}")
    if cfg.executor == "slurm":
        load_profile(cfg.profile)  # a missing profile names the available ones before anything runs
    grid = load_grid(cfg.grid)  # names the valid grids if this one does not exist
    labels = [r.label for r in grid.rows]
    unknown = [r for r in cfg.rows.split(",") if r and r not in labels]
    if unknown:
        raise ConfigError(f"rows {unknown} are not in {cfg.grid}; its rows: {', '.join(labels)}")
    return cfg


def cells_of(grid: Grid, cfg: RunConfig) -> list[Cell]:
    root, cells = Path(cfg.out) / cfg.scale, {}
    wanted = {r for r in cfg.rows.split(",") if r}
    for row in grid.rows:
        if row.cell is None or (wanted and row.label not in wanted):
            continue
        resolved = resolve(row.cell, cfg.scale, cfg.set)
        cid = cell_id(resolved)
        cells.setdefault(cid, Cell(cid, root / "cells" / cid, resolved, [])).rows.append(row)
    return list(cells.values())


def data_id(cfg: dict) -> str:
    return cell_id({k: v for k, v in cfg.items() if k.startswith("data.") or k == "weights"})


def stage1_dir(cell: Cell, run: RunConfig) -> Path:
    """Stage 1 is keyed by the config without stage-2 and eval keys, so every alignment variant of a
    model (Table 7, Figure 5) and the unaligned cell share one trained run."""
    sid = cell_id({k: v for k, v in cell.cfg.items() if not k.startswith(("rl.", "eval."))})
    return Path(run.out) / run.scale / "stage1" / sid


def _data_paths(cfg: dict, data_dir: Path) -> tuple[str, str, str | None]:
    """(eval reference manifest, RL prompts, eval subset) of a cell."""
    if cfg["data.source"] == "demo":
        src = data_dir / "demo_source"
        return str(src / "test.csv"), str(src / "train.csv"), str(src / "eval_subset.txt")
    missing = [k for k in ("data.train", "data.test", "data.prompts") if k not in cfg]
    if missing:
        raise ConfigError(f"scale=paper needs your manifests: {', '.join(f'set.{k}=FILE' for k in missing)} "
                          "(id,audio,caption CSV/JSONL: training set, AudioCaps test set, RL prompts)")
    return cfg["data.test"], cfg["data.prompts"], cfg.get("data.subset")


def plan(cells: list[Cell], run: RunConfig) -> list[Job]:
    """prepare (once per data config) -> train expert_0..K-1 (once per stage-1 config) -> [align] -> eval."""
    root, jobs = Path(run.out) / run.scale, {}
    res = dict(gpus=run.gpus, cpus=run.cpus, mem_gb=run.mem_gb)
    for cell in cells:
        did = data_id(cell.cfg)
        data_dir = root / "data" / did
        ref, prompts, subset = _data_paths(cell.cfg, data_dir)
        prep = f"data-{did}"
        jobs.setdefault(prep, Job(prep, steps.prepare_step, dict(data_dir=str(data_dir), cfg=cell.cfg),
                                  data_dir / "prepared.done", cpus=2, mem_gb=run.mem_gb, timeout_min=24 * 60))
        stage1 = stage1_dir(cell, run)
        trains = [f"stage1-{stage1.name}/expert_{k}" for k in range(int(cell.cfg["model.distribution"].split("-")[0]))]
        for k, key in enumerate(trains):
            jobs.setdefault(key, Job(key, steps.train_step, dict(cfg=cell.cfg, run_dir=str(stage1),
                                                                 data_dir=str(data_dir), expert=k),
                                     stage1 / f"expert_{k}.done", deps=[prep], timeout_min=run.train_timeout_min,
                                     resumable=True, array=f"stage1-{stage1.name}", **res))
        model_dir, before_eval = stage1, trains
        if "rl.method" in cell.cfg:
            model_dir, key = cell.dir / "aligned", f"{cell.id}/align"
            jobs[key] = Job(key, steps.align_step, dict(cfg=cell.cfg, stage1_dir=str(stage1), out=str(model_dir),
                                                        prompts=prompts),
                            cell.dir / "aligned.done", deps=trains, timeout_min=run.train_timeout_min,
                            resumable=True, **res)
            before_eval = [key]
        key = f"{cell.id}/eval"
        ecfg = {**cell.cfg, "eval.subset": subset} if subset else cell.cfg
        jobs[key] = Job(key, steps.eval_step, dict(cfg=ecfg, run_dir=str(model_dir), ref=ref, out=str(cell.dir / "eval")),
                        cell.dir / "eval.done", deps=before_eval, timeout_min=12 * 60, **res)
    return list(jobs.values())


def _params(cell: Cell, column: str) -> str:
    from siren.model.params import model_params
    from siren.train import parse as stage1_parse

    experts = model_params(stage1_parse(steps.stage1_args(cell.cfg)).model)
    per_expert = max(e.total for e in experts)
    n = {"#Parameter": len(experts), "#Single Para.": 1, "#Train Parameter": int(cell.cfg.get("rl.n", 0))}[column]
    total = per_expert * n
    return f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"


METRIC_COLUMNS = {"FAD": "fad", "FD": "fd", "ISC": "isc", "KL": "kl", "CLAP": "clap"}  # results.json keys


def outcome(cell: Cell, grid: Grid, run: RunConfig, states: dict[str, JobState]) -> Outcome:
    mine = {k: s for k, s in states.items() if k.startswith((cell.id, f"stage1-{stage1_dir(cell, run).name}"))}
    bad = [s for s in mine.values() if s.state not in pipeline.LIVE | {"DONE", "MISSING", "BLOCKED"}]
    results = steps.result_path(cell.dir)
    if not results.is_file():
        if bad:
            return Outcome({}, "failed", f"{bad[0].key}: {bad[0].log}")
        return Outcome({}, "pending")
    import json

    res = json.loads(results.read_text())
    if res.get("status") == "itg":
        return Outcome({}, "itg", res.get("reason", ""))
    values = {col: res["metrics"].get(key) for col, key in METRIC_COLUMNS.items() if col in grid.columns}
    if {"Loss Mean", "Loss Ratio"} & set(grid.columns):
        from analysis.convergence import loss_stats

        stats = loss_stats(stage1_dir(cell, run))
        values.update({"Loss Mean": stats["loss_mean"], "Loss Ratio": stats["loss_ratio"]})
    for col in ("#Parameter", "#Single Para.", "#Train Parameter"):
        if col in grid.columns:
            values[col] = _params(cell, col)
    return Outcome(values)


def figure(grid: Grid, cells: list[Cell], run: RunConfig, cap: str, out_dir: Path) -> list[Path]:
    """The grid's figure from the cells that got that far (none drawn yet is not an error)."""
    from ablations import figures

    if grid.figure == "convergence":
        runs = {r.label: stage1_dir(c, run) for c in cells for r in c.rows
                if all((stage1_dir(c, run) / f"expert_{k}.done").is_file()
                       for k in range(int(c.cfg["model.distribution"].split("-")[0])))}
        return figures.layer_losses(grid, runs, cap, out_dir) if runs else []
    if grid.figure == "reward_curves":
        runs = {r.label: c.dir / "aligned" for c in cells for r in c.rows if (c.dir / "aligned.done").is_file()}
        return figures.reward_curves(grid, runs, cap, out_dir) if runs else []
    return []


def caption(run: RunConfig, cells: list[Cell]) -> str:
    weights = {c.cfg["weights"] for c in cells}
    loud = "RANDOM weights (codec, text encoder and metric backbones): not comparable to published numbers" \
        if "random" in weights else "pretrained weights"
    return f"scale={run.scale}; {loud}"


def status_lines(jobs: list[Job], states: dict[str, JobState], cells: list[Cell]) -> list[str]:
    rows_of = {c.id: ", ".join(r.label for r in c.rows) for c in cells}
    lines = [f"{'job':34s} {'state':10s} {'id':>10s}  rows / log"]
    for job in jobs:
        st = states[job.key]
        detail = st.log if st.state != "DONE" and st.log else rows_of.get(job.key.split("/")[0], "")
        lines.append(f"{job.key:34s} {st.state:10s} {st.job_id:>10s}  {detail}")
    return lines


def current_states(jobs: list[Job], root: Path) -> dict[str, JobState]:
    ledger = pipeline.Ledger(root)
    return {j.key: ledger.state(j) for j in jobs}


def main(argv: list[str] | None = None) -> int:
    run = parse(sys.argv[1:] if argv is None else argv)
    grid = load_grid(run.grid)
    cells = cells_of(grid, run)
    jobs = plan(cells, run)
    root = Path(run.out) / run.scale
    print(f"{grid.name}: {len(grid.rows)} rows -> {len(cells)} cells, {len(jobs)} jobs; scale={run.scale}, "
          f"executor={run.executor}; results under {root}")
    if run.action == "cancel":  # every recorded SLURM job not done (sacct may not list a fresh one yet)
        ledger = pipeline.Ledger(root)
        ids = [rec["job_id"] for j in jobs if not j.done.is_file() and (rec := ledger.get(j.key))
               and rec["executor"] == "slurm"]
        if ids:
            import subprocess

            subprocess.run(["scancel", *ids], check=True)
        print(f"cancelled {len(ids)} job(s)" + ("" if ids else " (nothing recorded on SLURM is unfinished)"))
        return 0
    if run.action == "run":
        for cell in cells:  # what each cell directory is, for a reader browsing results
            io.write_json(cell.dir / "cell.json", {"id": cell.id, "config": cell.cfg, "rows": [r.label for r in cell.rows]})
        if run.executor == "slurm":
            from ablations.executors import load_profile

            states = pipeline.submit_slurm(jobs, root, load_profile(run.profile), run.retry)
        else:
            states = pipeline.run_waves(jobs, root, run.executor, run.retry, run.max_parallel)
    else:
        states = current_states(jobs, root)
    print("\n".join(status_lines(jobs, states, cells)))
    if run.action == "run":
        print(f"submitted {sum(s.submitted for s in states.values())} job(s) in this call")
    if run.action == "status":
        return 0
    outcomes = {row.label: outcome(cell, grid, run, states) for cell in cells for row in cell.rows}
    cap = caption(run, cells)
    df = build_frame(grid, outcomes, f"ours ({run.scale}, {'RANDOM weights' if 'RANDOM' in cap else 'pretrained'})")
    paths = write_tables(df, grid, cap, root / "tables")
    for ext, p in paths.items():
        print(f"{grid.name}.{ext}: {p}")
    for p in figure(grid, cells, run, cap, root / "figures"):
        print(f"figure: {p}")
    failed = [s for s in states.values() if s.state in pipeline.FINAL_BAD | {"FAILED"}]
    if failed:
        print(f"{len(failed)} job(s) failed; see the logs above; `retry=true` resubmits them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SirenError, ValueError, FileNotFoundError) as e:  # bad grid/key/profile, held lock: the message says how
        sys.exit(f"error: {e}")
