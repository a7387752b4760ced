"""The figure a grid draws beside its table, with the analysis probes' shared style."""
from __future__ import annotations

from pathlib import Path

from ablations.grid import Grid


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
    from analysis.reward_curves import RewardCurvesConfig, run

    return run(RewardCurvesConfig(runs=",".join(str(r) for r in runs.values()), labels=",".join(runs),
                                  results=",".join(str(r.parent / "eval" / "results.json") for r in runs.values()),
                                  out=str(out_dir)))
