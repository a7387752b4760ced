"""Fig. 5: reward during stage-2 training for several strategies (anti-causal RL, DPO, causal RL).

Each run is a stage-2 output directory of ``python -m siren.rl`` (its ``rl/log.jsonl`` has
``step`` and ``reward_mean`` per step) or a JSONL file with those keys. Curves are smoothed
with a bias-corrected EMA (``smooth``) and drawn on one plot; each is labelled with its
(FD, CLAP) pair when an eval ``results.json`` is found for that run (``results=[...]``,
else ``<run>/results.json`` or ``<run>/eval/results.json``). ``fd_key`` / ``clap_key`` name the
metrics inside the results file (eval/audiocaps.py writes lower-case ``fd`` and ``clap``,
CLAP already x100).

    python -m analysis.reward_curves runs=[runs/rl,runs/dpo,runs/causal] labels=[RL,DPO,Causal]
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from analysis import style
from analysis.cli import as_list, command, out_dir, write_csv
from analysis.logs import metric_of, metrics_phrase, provenance, read_jsonl, read_results, results_weights, weights_note
from siren.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class RewardCurvesConfig:
    runs: str = ""  # [a,b,c]: stage-2 run dirs (rl/log.jsonl inside) or JSONL files
    labels: str = ""  # [RL,DPO,Causal]: one per run; default the folder names
    results: str = ""  # optional [..]: results.json per run (default <run>/results.json or <run>/eval/results.json)
    reward_key: str = "reward_mean"
    fd_key: str = "fd"  # key of FD in results.json's "metrics"
    clap_key: str = "clap"  # key of the CLAP score in results.json's "metrics"
    smooth: float = 0.9  # EMA weight of the past per RL step (0 = raw)
    out: str = ""

    def __post_init__(self):
        if not 0 <= self.smooth < 1:
            raise ConfigError(f"smooth={self.smooth}: the EMA weight of the past, in [0, 1)")


def log_path(run: str | Path) -> Path:
    p = Path(run)
    for cand in (p, p / "rl" / "log.jsonl", p / "log.jsonl"):
        if cand.is_file():
            return cand
    raise DataError(f"{run}: no stage-2 log (expected {p / 'rl' / 'log.jsonl'} or a .jsonl file)")


def reward_curve(run: str | Path, key: str = "reward_mean") -> tuple[np.ndarray, np.ndarray]:
    """(steps, rewards) of a stage-2 log; a step logged twice keeps its last entry."""
    path = log_path(run)
    by_step = {int(r["step"]): float(r[key]) for r in read_jsonl(path) if key in r and r[key] is not None}
    if not by_step:
        raise DataError(f"{path}: no '{key}' entries")
    steps = np.array(sorted(by_step))
    return steps, np.array([by_step[s] for s in steps])


def find_results(run: str | Path, given: str = "") -> Path | None:
    if given:
        if not Path(given).is_file():
            raise DataError(f"results file {given} does not exist")
        return Path(given)
    p = Path(run)
    return next((c for c in (p / "results.json", p / "eval" / "results.json") if p.is_dir() and c.is_file()), None)


LABEL_GAP_PT = 7.5  # end labels are 5 pt text (a box ~6 pt high); 6.5 left the parentheses touching


def _spread(ys: list[float], gap: float) -> list[float]:
    """Offsets (points) that set positions ``ys`` (points) at least ``gap`` apart: each cluster of positions
    too close together becomes a stack ``gap`` apart centred on the cluster's mean; the rest stay put."""
    def centre(g: list[int]) -> float:
        return sum(ys[k] for k in g) / len(g)

    groups: list[list[int]] = []  # clusters in rising order
    for k in sorted(range(len(ys)), key=lambda k: ys[k]):
        groups.append([k])
        while len(groups) > 1 and (centre(groups[-2]) + (len(groups[-2]) - 1) * gap / 2 + gap
                                   > centre(groups[-1]) - (len(groups[-1]) - 1) * gap / 2):
            groups[-2:] = [groups[-2] + groups[-1]]
    out = [0.0] * len(ys)
    for g in groups:
        bottom = centre(g) - (len(g) - 1) * gap / 2
        for i, k in enumerate(g):
            out[k] = bottom + i * gap - ys[k]
    return out


def plot(curves: list[dict], smooth: float, note: str = ""):
    """The curves as drawn: each run's reward smoothed by a bias-corrected EMA of weight ``smooth`` (the axis says
    so; rewards.csv has the raw and smoothed values)."""
    fig, ax = style.figure(style.COLUMN, 0.75)
    colors = style.class_colors(max(len(curves), 1))
    ends = []
    for c, color in zip(curves, colors):
        y = style.ema(c["reward"], smooth, c["steps"])
        ax.plot(c["steps"], y, color=color, label=c["label"])
        if c["pair"]:
            ends.append((c["pair"], (c["steps"][-1], y[-1]), color))
    ax.axhline(0.0, color="0.6", lw=0.5, ls=":")
    labels = [ax.annotate(text, xy, xytext=(3, 0), textcoords="offset points", fontsize=5, color=color, va="center")
              for text, xy, color in ends]
    ax.set_xlabel("RL step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 0.5 ticks on a 4-step run
    ax.set_ylabel(f"Reward (mean cosine, EMA {smooth:g})" if smooth else "Reward (mean cosine)")
    ax.legend()
    style.note(fig, note)
    # runs that end close together (same prompts each step) would print their (FD, CLAP) over each other: stack
    # them by where the ends are once laid out (the layout shrinks the axes; before it, ends looked further apart)
    for _ in range(2):  # moving a label can move the layout a little: measure once more
        fig.draw_without_rendering()
        ys = [ax.transData.transform(xy)[1] * 72 / fig.dpi for _, xy, _ in ends]
        for label, dy in zip(labels, _spread(ys, LABEL_GAP_PT)):
            label.xyann = (3, dy)
    return fig


def run(cfg: RewardCurvesConfig) -> list:
    runs = as_list(cfg.runs)
    if not runs:
        raise ConfigError("runs=[dir1,dir2,...] is required (stage-2 run directories or JSONL logs)")
    labels = as_list(cfg.labels) or [Path(r).name for r in runs]
    results = as_list(cfg.results) or [""] * len(runs)
    if len(labels) != len(runs) or len(results) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(labels)} labels and {len(results)} results; give one each")
    return draw_curves(runs, labels, results, out_dir(cfg.out, "reward_curves"), cfg.reward_key, cfg.fd_key,
                       cfg.clap_key, cfg.smooth)


def draw_curves(runs: list[str | Path], labels: list[str], results: list[str | Path], folder: Path,
                reward_key: str = "reward_mean", fd_key: str = "fd", clap_key: str = "clap",
                smooth: float = 0.9, caption: str = "") -> list[Path]:
    """Figure 5 from stage-2 runs (one label and optional results.json each): CSVs and the figure, whose note is
    ``caption`` (a grid's scale and weights) and the runs' weights."""
    curves, rows, summary = [], [], []
    for r, label, res in zip(runs, labels, results):
        steps, reward = reward_curve(r, reward_key)
        path = find_results(r, str(res) if res else "")
        res = read_results(path) if path else None
        fd = metric_of(res, fd_key) if res else None
        clap = metric_of(res, clap_key) if res else None
        itg = bool(res) and res.get("status") == "itg"  # no audio, no metrics
        pair = "(itg)" if itg else f"({fd:.2f}, {clap:.2f})" if fd is not None and clap is not None else ""
        if path and not pair:
            log.warning("%s has no '%s'/'%s' metric; adjust fd_key= / clap_key=", path, fd_key, clap_key)
        curves.append(dict(label=label, steps=steps, reward=reward, pair=pair))
        weights = provenance(r)["weights"] if Path(r).is_dir() else "unknown (a log file)"  # the reward model's too
        rows += [dict(label=label, step=int(s), reward=float(v), smoothed=float(e), weights=weights)
                 for s, v, e in zip(steps, reward, style.ema(reward, smooth, steps))]
        summary.append(dict(label=label, run=str(r), steps=int(steps[-1]), final_reward=float(reward[-1]),
                            mean_last_10pct=float(reward[-max(1, len(reward) // 10):].mean()),
                            FD=fd, CLAP=clap, results=str(path or ""),
                            weights=weights,
                            metrics_weights=results_weights(res) if res else ""))
        log.info("%s: %d steps, last reward %+.4f%s", label, len(steps), reward[-1],
                 f", (FD, CLAP) = {pair}" if pair else ", no (FD, CLAP)" if path else ", no results.json")
    written = [write_csv(folder / "rewards.csv", rows), write_csv(folder / "summary.csv", summary)]
    # a grid's caption states the weights its evaluations used; alone, each (FD, CLAP)'s evaluation says its own
    scored = [] if caption else [metrics_phrase(s["metrics_weights"]) for s in summary if s["metrics_weights"]]
    notes = {weights_note(r) if Path(r).is_dir() else "weights unknown (a log file)" for r in runs}
    note = "; ".join([caption] * bool(caption) + sorted(notes - {""}) + sorted(set(scored)))
    written += style.save_figure(plot(curves, smooth, note), folder, "fig5_rewards")
    return written


if __name__ == "__main__":
    command("reward_curves", RewardCurvesConfig, run, __doc__)
