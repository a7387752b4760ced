"""What a grid run produced, for its table: each row's outcome (metric values, itg, failed, pending),
the caption that says which weights and scale, and the status lines of the jobs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Mapping

from ablations import steps
from ablations.grid import Grid
from ablations.ledger import LIVE, Job, JobState
from ablations.plan import Cell, RunConfig, data_dir, stage1_dir
from ablations.scales import stage_default
from ablations.tables import Outcome
from siren import io
from siren.errors import DataError

METRIC_COLUMNS = {"FAD": "fad", "FD": "fd", "ISC": "isc", "KL": "kl", "CLAP": "clap"}  # results.json keys
WEIGHTS_WORDS = {"random": "RANDOM weights (codec, text encoder and metric backbones): not comparable to published "
                           "numbers",
                 "demo": "demo weights (trained on the embedded set)",
                 "pretrained": "pretrained weights"}


def _params(cell: Cell, column: str) -> str:
    from siren.model.params import model_params

    if cell.cfg.get("model.family") == "continuous":
        from siren.model.continuous.params import counts

        total = counts(steps.continuous_config(cell.cfg))["total"]
        return f"{total / 1e6:.1f}M"
    experts = model_params(steps.model_config(cell.cfg))
    per_expert = max(e.total for e in experts)
    n = {"#Parameter": len(experts), "#Single Para.": 1, "#Train Parameter": int(cell.cfg.get("rl.n", 0))}[column]
    total = per_expert * n
    return f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"


# UNKNOWN: sacct has no row (yet, or slurmdbd is down); the launcher takes such a job as possibly running, not failed
NOT_FAILED = LIVE | {"DONE", "MISSING", "BLOCKED", "UNKNOWN"}


def outcome(cell: Cell, grid: Grid, run: RunConfig, states: dict[str, JobState]) -> Outcome:
    did = data_dir(cell.cfg, run.root).name  # its data's jobs too: a failed prepare leaves every row's jobs waiting
    mine = {k: s for k, s in states.items()
            if k.startswith((cell.id, f"stage1-{stage1_dir(cell, run).name}", f"data-{did}", f"latents-{did}-"))}
    bad = [s for s in mine.values() if s.state not in NOT_FAILED]
    results, done = steps.result_path(cell.dir), cell.dir / "eval.done"
    # the done marker is written last: a results.json without it is an earlier evaluation's, of a cell whose
    # evaluation runs again now (or failed again)
    if not (results.is_file() and done.is_file()):
        if bad:
            return Outcome({}, "failed", f"{bad[0].key}: {bad[0].log}")
        return Outcome({}, "pending")
    sizes = {col: _params(cell, col) for col in ("#Parameter", "#Single Para.", "#Train Parameter")
             if col in grid.columns}
    try:
        out = from_results(_results(results, done), grid)
    except DataError as e:  # this row only: the table keeps the others
        return Outcome(sizes, "failed", str(e))
    if out.status != "ok":  # itg: its size still printed beside it, as the paper prints 12-1's
        return Outcome(sizes, out.status, out.reason)
    values = dict(out.values)
    if {"Loss Mean", "Loss Ratio"} & set(grid.columns):
        from analysis.convergence import loss_stats

        try:
            stats = loss_stats(stage1_dir(cell, run))
        except DataError as e:  # a training log without a layer's CE: this row only, as above
            return Outcome({}, "failed", str(e))
        values.update({"Loss Mean": stats["loss_mean"], "Loss Ratio": stats["loss_ratio"]})
    return Outcome({**values, **sizes}, reward_metric=out.reward_metric, weights=out.weights)


def from_results(res: dict, grid: Grid) -> Outcome:
    """A cell's eval/results.json as a row: its metric columns, and which of them the stage-2 reward model computes
    (the card's reward_equals_metric)."""
    if res.get("status") == "itg":
        return Outcome({}, "itg", res.get("reason", ""))
    marked = res.get("card", {}).get("reward_equals_metric", [])
    cols = [col for col in METRIC_COLUMNS if col in grid.columns]
    return Outcome({col: res["metrics"].get(METRIC_COLUMNS[col]) for col in cols},
                   reward_metric=tuple(col for col in cols if METRIC_COLUMNS[col] in marked),
                   weights=(res.get("card") or {}).get("weights", ""))


CALIBRATION_LABELS = {"oracle": "oracle (references through the codec)", "chance": "chance (random codes)"}


def calibration_outcomes(cells: list[Cell], grid: Grid, run: RunConfig,
                         states: dict[str, JobState]) -> dict[str, Outcome]:
    """The calibration rows (README: calibration) of the cells' data config, for the metric columns."""
    from ablations.plan import calibration_dir, calibration_id

    if not run.calibrated or not cells:
        return {}
    out = {}
    for kind, label in CALIBRATION_LABELS.items():
        folder = calibration_dir(run, cells[0], kind)
        results = folder / "results.json"
        state = states.get(f"calib-{calibration_id(cells[0].cfg)}/{kind}")
        if not (results.is_file() and folder.with_suffix(".done").is_file()):  # as a cell's: done marker last
            failed = state is not None and state.state not in NOT_FAILED
            out[label] = Outcome({}, "failed", f"{state.key}: {state.log}") if failed else Outcome({}, "pending")
            continue
        try:
            res = _results(results, folder.with_suffix(".done"))
        except DataError as e:
            out[label] = Outcome({}, "failed", str(e))
            continue
        out[label] = Outcome({col: res["metrics"].get(key) for col, key in METRIC_COLUMNS.items()
                              if col in grid.columns}, weights=(res.get("card") or {}).get("weights", ""))
    return out


def _results(path: Path, done: Path) -> dict:
    """An evaluation's results.json; one that does not parse is an error saying how to evaluate again."""
    res = io.read_json(path, f"delete {done} and run the grid again: the evaluation runs again (its generated "
                             f"clips are kept)")
    if not isinstance(res, dict) or not (res.get("status") == "itg" or isinstance(res.get("metrics"), dict)):
        raise DataError(f"{path}: not an evaluation's results.json; delete {done} and run the grid again")
    return res


def weights_of(cells: list[Cell]) -> str:
    """The weights mode of a run's cells (one per scale)."""
    return next(iter({c.cfg["weights"] for c in cells}), "pretrained")


def caption(run: RunConfig, cells: list[Cell], rows: Mapping[str, Outcome]) -> str:
    """The scale and weights mode the grid ran with; the evaluations' own labels where they say otherwise (a file
    put in place of a pretrained one, a mixed card); the `set.` overrides, which change what the table shows."""
    mode = weights_of(cells)
    other = sorted({o.weights for o in rows.values() if o.weights and o.weights != mode})
    words = [f"scale={run.scale}", WEIGHTS_WORDS[mode]]
    words += [f"evaluated with: {' | '.join(other)}"] * bool(other)
    # a title may name the paper's reward (Figure 5: ImageBind); the demo scale aligns with the CLAP checkpoint
    aligned = [c.cfg for c in cells if "rl.method" in c.cfg]
    default = stage_default("rl.reward.name") if aligned else None  # built from the schema: once, and only if read
    rewards = sorted({cfg.get("rl.reward.name", default) for cfg in aligned})
    words += [f"stage-2 reward: {', '.join(rewards)}"] * bool(rewards)
    words += [f"set: {', '.join(f'{k}={v}' for k, v in sorted(run.set.items()))}"] * bool(run.set)
    return "; ".join(words)


def source(run: RunConfig, cells: list[Cell]) -> str:
    """How our rows are labelled in the table, e.g. 'ours (demo, RANDOM weights)'."""
    w = weights_of(cells)
    return f"ours ({run.scale}, {'RANDOM weights' if w == 'random' else w + ' weights'})"


def status_lines(jobs: list[Job], states: dict[str, JobState]) -> list[str]:
    lines = [f"{'job':34s} {'state':10s} {'id':>10s}  rows / log"]
    for job in jobs:
        st = states[job.key]
        detail = st.log if st.state != "DONE" and st.log else job.rows
        lines.append(f"{job.key:34s} {st.state:10s} {st.job_id:>10s}  {detail}")
    counts = Counter(states[j.key].state for j in jobs)  # a run on SLURM is followed with action=status
    missing = ["MISSING: not submitted yet (the same command without action= runs them)"] if counts["MISSING"] else []
    return lines + [f"{len(jobs)} job(s): " + ", ".join(f"{n} {state}" for state, n in counts.most_common())] + missing
