"""The figure a grid draws beside its table, with the analysis probes' shared style."""
from __future__ import annotations

import logging
from pathlib import Path

from ablations.grid import Grid
from ablations.outcomes import METRIC_COLUMNS
from ablations.plan import Cell, RunConfig, stage1_dir
from ablations.tables import Outcome
from siren.errors import DataError

log = logging.getLogger(__name__)


def draw(grid: Grid, cells: list[Cell], run: RunConfig, caption: str, out_dir: Path,
         outcomes: dict[str, Outcome]) -> list[Path]:
    """The grid's figure from the cells that got that far (none drawn yet is not an error); ``outcomes``:
    the table's rows of ours, calibration rows included, by label. A damaged run record (a training or stage-2
    log, a results.json) leaves the figure out with a warning naming it; the tables are written by then."""
    try:
        return _draw(grid, cells, run, caption, out_dir, outcomes)
    except DataError as e:
        log.warning("the %s figure is not drawn: %s", grid.name, e)
        return []


def _draw(grid: Grid, cells: list[Cell], run: RunConfig, caption: str, out_dir: Path,
          outcomes: dict[str, Outcome]) -> list[Path]:
    if grid.figure == "convergence":
        runs = {r.label: stage1_dir(c, run) for c in cells for r in c.rows
                if all((stage1_dir(c, run) / f"expert_{k}.done").is_file() for k in range(c.n_experts))}
        return layer_losses(grid, runs, caption, out_dir) if runs else []
    if grid.figure == "reward_curves":
        runs = {r.label: c.dir / "aligned" for c in cells for r in c.rows if (c.dir / "aligned.done").is_file()}
        return reward_curves(runs, caption, out_dir) if runs else []
    if grid.figure == "metrics":
        return metric_bars(grid, outcomes, caption, out_dir)
    return []


def metric_bars(grid: Grid, outcomes: dict[str, Outcome], caption: str, out_dir: Path) -> list[Path]:
    """One panel per metric column of the table: every evaluated row's value, calibration rows included,
    so the model rows are seen between the oracle and chance (a grid with no training curve to draw)."""
    import numpy as np

    from analysis import style

    cols = [c for c in grid.columns if c in METRIC_COLUMNS]
    done = {label: o.values for label, o in outcomes.items() if o.status == "ok" and o.values}
    if not cols or not done:
        return []
    labels = list(done)
    fig, axes = style.figure(style.TWO_COLUMN, 0.1 + 0.05 * len(labels), ncols=len(cols), sharey=True)
    for ax, col in zip(np.atleast_1d(axes), cols):
        values = [done[label].get(col) for label in labels]
        ax.barh(range(len(labels)), [np.nan if v is None else float(v) for v in values])
        ax.set_title(col)
        ax.invert_yaxis()  # table order, top to bottom
    np.atleast_1d(axes)[0].set_yticks(range(len(labels)), labels)
    style.note(fig, caption)
    return style.save_figure(fig, out_dir, grid.name)


def layer_losses(grid: Grid, runs: dict[str, Path], caption: str, out_dir: Path) -> list[Path]:
    """Final training CE of every RVQ layer, one line per row (Table 6: what its loss ratio summarises)."""
    from analysis import style
    from analysis.convergence import loss_stats

    fig, ax = style.figure(style.COLUMN, 0.75)
    for label, run in runs.items():
        final = loss_stats(run)["final"]
        layers = sorted(final)
        ax.plot(layers, [final[j] for j in layers], marker="o", markersize=2.5, label=label)
    ax.set_xlabel("RVQ layer")
    ax.set_ylabel("Final training CE")
    ax.set_xticks(range(1, 13))
    ax.legend(title="distribution")
    style.note(fig, caption)
    return style.save_figure(fig, out_dir, grid.name)


def reward_curves(runs: dict[str, Path], caption: str, out_dir: Path) -> list[Path]:
    """Figure 5: stage-2 reward curves, each labelled with its (FD, CLAP) when evaluated; the note says the scale
    (``caption``) and the runs' weights."""
    from analysis.reward_curves import draw_curves

    # a run whose evaluation is pending or failed is drawn without its (FD, CLAP), not an error for the figure; a
    # results.json without the done marker is an earlier evaluation's
    results = [r.parent / "eval" / "results.json" if (r.parent / "eval.done").is_file() else "" for r in runs.values()]
    return draw_curves(list(runs.values()), list(runs), results, out_dir, caption=caption)
