"""The figure a grid draws beside its table, with the analysis probes' shared style."""
from __future__ import annotations

from pathlib import Path

from ablations.grid import Grid
from ablations.plan import Cell, RunConfig, stage1_dir


def draw(grid: Grid, cells: list[Cell], run: RunConfig, caption: str, out_dir: Path) -> list[Path]:
    """The grid's figure from the cells that got that far (none drawn yet is not an error)."""
    if grid.figure == "convergence":
        runs = {r.label: stage1_dir(c, run) for c in cells for r in c.rows
                if all((stage1_dir(c, run) / f"expert_{k}.done").is_file() for k in range(c.n_experts))}
        return layer_losses(grid, runs, caption, out_dir) if runs else []
    if grid.figure == "reward_curves":
        runs = {r.label: c.dir / "aligned" for c in cells for r in c.rows if (c.dir / "aligned.done").is_file()}
        return reward_curves(grid, runs, caption, out_dir) if runs else []
    return []


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


def reward_curves(grid: Grid, runs: dict[str, Path], caption: str, out_dir: Path) -> list[Path]:
    """Figure 5: stage-2 reward curves, each labelled with its (FD, CLAP) when evaluated."""
    from analysis.reward_curves import draw_curves

    return draw_curves(list(runs.values()), list(runs), [r.parent / "eval" / "results.json" for r in runs.values()],
                       out_dir, caption)
