"""Influence 2 (section 3, Fig. 2d, Fig. 6) and Table 5's "Loss Mean" / "Loss Ratio".

Stage-1 training (siren.train) logs one JSON object per logged step to
``run_dir/expert_<k>/log.jsonl`` with the per-layer cross-entropy ``ce/L<j>`` (paper
numbering, j = 1..12) averaged over the steps since the previous entry; validation entries
carry ``"val": true``. Layer j's curve comes from whichever expert owns it, so a 6-2 run and
a 1-12 run give the same 12 curves.

Table 5 (ours, the paper gives no formula):
- final loss of layer j = mean of ``ce/L<j>`` over the last ``tail`` fraction (default 10 %,
  at least one entry) of that layer's logged training entries;
- loss mean = mean over the 12 layers of the final loss;
- loss ratio = final loss of layer 12 / final loss of layer 1.

    python -m analysis.convergence run=runs/siren-6-2
    from analysis.convergence import loss_stats; loss_stats("runs/x")  # {"loss_mean": .., "loss_ratio": ..}
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import style
from analysis.cli import command, int_list, out_dir, write_csv
from analysis.logs import provenance, read_jsonl, weights_note
from siren.checkpoint import load_latest
from siren.codec import N_LAYERS
from siren.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"^ce/L(\d+)$")
EXPERT_DIR = re.compile(r"^expert_(\d+)$")
AUDIOGEN = "1-12, conditioning=none"  # the model of the paper's Fig. 2d / 6 (analysis.logs.provenance's words)


@dataclass
class ConvergenceConfig:
    run: str = ""  # stage-1 run directory (holds expert_<k>/log.jsonl)
    split: str = "train"  # train | val (validation entries)
    tail: float = 0.1  # fraction of the last logged entries averaged into the "final" loss
    smooth: float = 0.0  # EMA weight of the past per training step for the plotted curves (0 = raw; CSV is always raw)
    panels: str = "1,4,8,12"  # layers drawn in Fig. 2d (all 12 go to Fig. 6)
    out: str = ""

    def __post_init__(self):
        if not 0 < self.tail <= 1:
            raise ConfigError(f"tail={self.tail}: the fraction of the last logged entries, in (0, 1]")
        if not 0 <= self.smooth < 1:
            raise ConfigError(f"smooth={self.smooth}: the EMA weight of the past, in [0, 1)")


def expert_logs(run_dir: str | Path) -> dict[int, Path]:
    run_dir = Path(run_dir)
    logs = {int(m.group(1)): p / "log.jsonl" for p in run_dir.iterdir()
            if (m := EXPERT_DIR.match(p.name)) and (p / "log.jsonl").is_file()} if run_dir.is_dir() else {}
    if not logs:
        raise DataError(f"{run_dir}: no expert_<k>/log.jsonl; give the run directory of a stage-1 run "
                        f"(python -m siren.train run_dir=...)")
    return dict(sorted(logs.items()))


def layer_curves(run_dir: str | Path, split: str = "train") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """RVQ layer j (1-based) -> (steps, ce) over all experts of the run, one value per logged step
    (a step logged twice, e.g. around a resume, keeps its last entry)."""
    if split not in ("train", "val"):
        raise ConfigError(f"split must be train or val, got '{split}'")
    curves: dict[int, dict[int, float]] = {}
    owner: dict[int, int] = {}
    dropped: dict[int, int] = {}
    for k, path in expert_logs(run_dir).items():
        for row in read_jsonl(path):
            if bool(row.get("val", False)) != (split == "val"):
                continue
            for key, v in row.items():
                m = LAYER_KEY.match(key)
                if not m or v is None:
                    continue
                if not math.isfinite(float(v)):  # training stops on one; a validation value can still be one
                    dropped[int(m.group(1))] = dropped.get(int(m.group(1)), 0) + 1
                    continue
                j = int(m.group(1))
                if owner.setdefault(j, k) != k:
                    raise DataError(f"{run_dir}: layer {j} is logged by expert_{owner[j]} and expert_{k}; "
                                    f"one run directory must hold one model")
                curves.setdefault(j, {})[int(row["step"])] = float(v)
    if dropped:  # said, not silently skipped: a diverged layer would otherwise read as converged
        log.warning("%s: non-finite %s CE left out of the curves (layer: entries) %s", run_dir, split,
                    ", ".join(f"{j}: {n}" for j, n in sorted(dropped.items())))
    return {j: (np.array(sorted(c)), np.array([c[s] for s in sorted(c)])) for j, c in sorted(curves.items())}


def final_loss(values: np.ndarray, tail: float = 0.1) -> float:
    """Mean of the last ``tail`` fraction of the logged values (at least one)."""
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    n = max(1, math.ceil(tail * len(values)))
    return float(np.mean(values[-n:]))


def loss_stats(run_dir: str | Path, tail: float = 0.1, split: str = "train") -> dict:
    """Table 5: {"loss_mean", "loss_ratio", "final": {j: final CE of layer j}} of a stage-1 run."""
    curves = layer_curves(run_dir, split)
    missing = [j for j in range(1, N_LAYERS + 1) if j not in curves]
    if missing:
        raise DataError(f"{run_dir}: no {split} 'ce/L<j>' entries for layers {missing}; are all experts' "
                        f"logs there (expert_<k>/log.jsonl)?")
    ends: dict[int, list[int]] = {}  # last logged step -> layers
    for j in range(1, N_LAYERS + 1):
        ends.setdefault(int(curves[j][0][-1]), []).append(j)
    unfinished = _unfinished(run_dir)
    if unfinished or len(ends) > 1:  # an unfinished expert's "final" CE is of another step than the others'
        where = ", ".join(f"step {s} for layers {_span(js)}" for s, js in sorted(ends.items()))
        why = "; ".join(unfinished) or "the experts' logs end at different steps"
        raise DataError(f"{run_dir}: {why} ({split} logs end at {where}): Table 5's final CEs compare finished "
                        f"experts; finish the run (its siren.train commands again) first")
    final = {j: final_loss(curves[j][1], tail) for j in range(1, N_LAYERS + 1)}
    return {"loss_mean": float(np.mean(list(final.values()))), "loss_ratio": final[N_LAYERS] / final[1],
            "final": final}


def _unfinished(run_dir: str | Path) -> list[str]:
    """"expert k is unfinished (step s of n)" for each expert whose latest checkpoint says so."""
    out = []
    for k in expert_logs(run_dir):
        try:
            c = load_latest(Path(run_dir) / f"expert_{k}")
        except CheckpointError as e:  # a `latest` naming a missing folder: said in the DataError, as a row's failure
            out.append(f"expert {k}: {e}")
            continue
        if c is not None and c.state.get("finished") is False:
            out.append(f"expert {k} is unfinished (step {c.step} of {c.state.get('train', {}).get('steps', '?')})")
    return out


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers[-1] - layers[0] == len(layers) - 1 else \
        ", ".join(map(str, layers))


def plot(curves: dict, layers: list[int], smooth: float, split: str, width: float, note: str = ""):
    fig, ax = style.figure(width, 0.6 if width > style.COLUMN else 0.75)
    colors = style.layer_colors(N_LAYERS)
    for j in layers:
        steps, v = curves[j]
        ax.plot(steps, style.ema(v, smooth, steps), color=colors[j - 1], label=f"layer {j}")
    ax.set_xlabel("Training step")
    ax.set_ylabel(f"{'Validation' if split == 'val' else 'Training'} CE loss")
    ax.legend(ncol=2 if len(layers) > 6 else 1)
    style.note(fig, note)
    return fig


def run(cfg: ConvergenceConfig) -> list:
    asked = int_list(cfg.panels, "panels")
    bad = [j for j in asked if not 1 <= j <= N_LAYERS]  # dropped below, they left Fig. 2d empty in silence
    if bad:
        raise ConfigError(f"panels={cfg.panels}: layers {bad} do not exist (1..{N_LAYERS})")
    if not cfg.run:
        raise ConfigError("run=<stage-1 run directory> is required")
    folder = out_dir(cfg.out, "convergence")
    curves = layer_curves(cfg.run, cfg.split)
    if not curves:
        raise DataError(f"{cfg.run}: no {cfg.split} 'ce/L<j>' entries in any expert log")
    prov = provenance(cfg.run)
    if prov["model"] != AUDIOGEN:  # Table 5's rows use loss_stats on every model; the figures are of AudioGen
        log.warning("%s is %s; the paper's Fig. 2d / 6 are of AudioGen, one transformer whose 12 heads read only "
                    "the backbone (%s, e.g. Table 5's Indpdt. cell)", cfg.run, prov["model"], AUDIOGEN)
    written = [write_csv(folder / "curves.csv", [dict(layer=j, step=int(s), ce=float(v), **prov)
                                                 for j, (st, vs) in curves.items() for s, v in zip(st, vs)])]
    try:
        stats = loss_stats(cfg.run, cfg.tail, cfg.split)
        written.append(write_csv(folder / "loss_stats.csv", [
            dict(loss_mean=stats["loss_mean"], loss_ratio=stats["loss_ratio"], tail=cfg.tail, split=cfg.split,
                 **{f"final_L{j}": v for j, v in stats["final"].items()}, **prov)]))
        print(f"Table 5: loss mean {stats['loss_mean']:.4f}, loss ratio (L12/L1) {stats['loss_ratio']:.4f} "
              f"(final = mean of the last {100 * cfg.tail:g}% of logged {cfg.split} entries)")
    except ValueError as e:
        log.warning("no Table 5 numbers: %s", e)
    panels = [j for j in asked if j in curves]
    if len(panels) < len(asked):
        log.warning("%s: no %s CE of layers %s: left out of Fig. 2d", cfg.run, cfg.split,
                    [j for j in asked if j not in curves])
    note = "; ".join(n for n in (prov["model"], weights_note(cfg.run)) if n and n != "unknown")
    written += style.save_figure(plot(curves, panels, cfg.smooth, cfg.split, style.COLUMN, note), folder,
                                 "fig2d_convergence")
    written += style.save_figure(plot(curves, sorted(curves), cfg.smooth, cfg.split, style.TWO_COLUMN, note), folder,
                                 "fig6_convergence")
    return written


if __name__ == "__main__":
    command("convergence", ConvergenceConfig, run, __doc__)
