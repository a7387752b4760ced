"""Fig. 7 (appendix D.3): how alike are the experts' task vectors, module by module?

Task vector of expert k: tau_k = theta_k(final) - theta_k(init), per parameter tensor; the
paper's experts share one initialisation. Tensors are grouped into the modules of Fig. 7:
Embedding (the 12 code-embedding projectors), Classifier (the heads), RVQ (residual) decoder
and Backbone transformer, the last two per block (their sos/positions/final norm form an
extra "io" entry). For each module and each pair of experts (15 pairs for 6 experts) the
cosine of the module's flattened task vectors; the figure shows per module the mean over
pairs (scatter, larger marker = deeper block) and the spread over pairs (boxplot). Tensors
no expert changed (the frozen DAC tables kept as buffers) are left out.

Initial weights: ``init=FILE`` (one safetensors state dict shared by all experts), else each
expert's ``expert_<k>/init.safetensors``, else its ``expert_<k>/step_00000000`` checkpoint.
``reference_step=N`` adds the paper's red reference: per module, the mean over experts of
cos(tau_k at checkpoint step N, tau_k final) (needs that checkpoint kept).

    python -m analysis.task_vectors run=runs/siren-6-2
"""
from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis import style
from analysis.cli import command, out_dir, write_csv
from analysis.logs import provenance, weights_note
from siren import checkpoint as ckpt
from siren.errors import CheckpointError, ConfigError, MissingWeightsError, WeightsMismatchError

GROUPS = ("embedding", "classifier", "decoder", "backbone")
TITLES = {"embedding": "Embedding", "classifier": "Classifier", "decoder": "RVQ Decoder", "backbone": "Backbone"}
_BLOCK = re.compile(r"^(backbone|decoder)\.blocks\.(\d+)\.")


@dataclass
class TaskVectorsConfig:
    run: str = ""  # stage-1 run directory with expert_<k>/ checkpoints (>= 2 experts)
    init: str = ""  # shared initial weights (safetensors); default per expert, see module docstring
    reference_step: int = -1  # >= 0: also cos(tau at this checkpoint step, tau final) per module
    out: str = ""

    def __post_init__(self):
        if self.reference_step < -1:
            raise ConfigError(f"reference_step={self.reference_step}: a checkpoint step >= 0, or -1 for none")


def module_of(name: str) -> tuple[str, str] | None:
    """Parameter name -> (group, layer) of Fig. 7; layer is the block index or "io"; None if not grouped."""
    m = _BLOCK.match(name)
    if m:
        return m.group(1), m.group(2)
    head = name.split(".", 1)[0]
    if head in ("backbone", "decoder"):
        return head, "io"
    if head == "heads":
        return "classifier", "all"
    if head == "embedding":
        return "embedding", "all"
    return None


def check_same_tensors(final, init, where: str) -> None:
    """The two open weight files (``siren.checkpoint.open_tensors``) hold the same tensors, of the same shapes."""
    if set(final.keys()) != set(init.keys()):
        diff = sorted(set(final.keys()) ^ set(init.keys()))
        raise WeightsMismatchError(f"{where}: the weights compared hold different tensors (e.g. {diff[:5]})")
    bad = [k for k in final.keys() if final.get_slice(k).get_shape() != init.get_slice(k).get_shape()]
    if bad:
        raise WeightsMismatchError(f"{where}: shapes differ between the weights compared for {bad[:5]}")


def task_vectors(finals: list, inits: list) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensor by tensor: (name, [K, n] float64), the K experts' tau_k = final_k - init_k of that tensor, flattened.

    One tensor of the K experts' is in memory at a time, written into its stack in place: the six task vectors of
    the isolated-1.6b model (273M parameters each) are 13 GB in float64 whole, the 3.1B model's 25 GB. The
    caller drops each stack before asking for the next (``module_cosines``)."""
    for name in finals[0].keys():
        stack = torch.empty(len(finals), math.prod(finals[0].get_slice(name).get_shape()), dtype=torch.float64)
        for k, (f, i) in enumerate(zip(finals, inits)):  # in float64 as (final - init) of the two cast, no copies
            stack[k].copy_(f.get_tensor(name).flatten())
            init = i.get_tensor(name).flatten()
            stack[k].sub_(init.double() if init.dtype == torch.bool else init)  # a bool is not subtracted
        yield name, stack
        del stack  # with the caller's reference gone, freed before the next is made


def module_cosines(stacks: Iterable[tuple[str, torch.Tensor]]) -> dict[tuple[str, str], np.ndarray]:
    """(group, layer) -> [K, K] cosine matrix of the experts' flattened module task vectors (``task_vectors``).

    Accumulates the Gram matrix tensor by tensor, so no module is ever concatenated."""
    grams: dict[tuple[str, str], torch.Tensor] = {}
    for name, stack in stacks:
        mod = module_of(name)
        # not ungrouped, nor frozen in every expert (no |stack| copy); a NaN stack is kept, its cosines NaN (until
        # 7f75a4b `abs().max() > 0` took it for a frozen one)
        if mod is not None and bool(stack.any()):
            grams[mod] = grams.get(mod, 0) + stack @ stack.T
        del stack  # before the generator builds the next one
    out = {}
    for mod, g in grams.items():
        d = g.diagonal().sqrt()
        out[mod] = (g / torch.outer(d, d).clamp_min(1e-300)).numpy()
    return out


@contextlib.contextmanager
def _open_file(path: Path) -> Iterator:
    """A safetensors file of initial weights, open tensor by tensor (never unpickled: a .pt is named)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingWeightsError(f"missing weights file {path}")
    try:
        f = safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as e:  # a .pt, a truncated copy: named
        raise WeightsMismatchError(f"{path}: not a safetensors state dict ({e}); give init=<file.safetensors> "
                                   f"(the experts' shared initial weights, saved with safetensors)") from None
    with f:
        yield f


def expert_dirs(run_dir: Path, init: str) -> dict[int, Path]:
    """expert k -> its folder: every expert of the run's distribution, each finished. A stage-2 folder only with
    ``init``: its experts' first checkpoints are the stage-1 weights, so its task vectors would be the RL updates."""
    from siren.model.config import from_saved
    from siren.run_dir import read_run_config

    shared = read_run_config(run_dir)
    if shared["model"].get("family") == "continuous":
        raise ConfigError(f"{run_dir}: a continuous-family run has one model, no experts to compare")
    n = from_saved(shared["model"], f"{run_dir / 'config.json'}: model").n_experts
    if (run_dir / "alignment.json").is_file() and not init:
        raise ConfigError(f"{run_dir} is a stage-2 run: its experts start from the stage-1 weights, so these task "
                          f"vectors would be the alignment's updates; run it on the stage-1 run, or give "
                          f"init=<the shared initial weights (a stage-1 expert's init.safetensors)>")
    if n < 2:
        raise ConfigError(f"{run_dir}: task vectors compare experts; its model has {n} (a 1-12 run has only one)")
    dirs, problems = {k: ckpt.expert_dir(run_dir, k) for k in range(n)}, []
    for k, d in dirs.items():
        last = ckpt.load_latest(d) if d.is_dir() else None
        if last is None:
            problems.append(f"expert {k}: missing ({d} has no checkpoint)")
        elif last.state.get("finished") is False:
            stage2 = last.state.get("stage") == 2
            of = (last.state.get("rl") if stage2 else last.state.get("train")) or {}
            problems.append(f"expert {k}: unfinished (step {last.step} of {of.get('steps', '?')}); resume it: "
                            + (f"python -m siren.rl out={run_dir} with its keys" if stage2 else
                               f"python -m siren.train run_dir={run_dir} expert={k} with the run's keys"))
    if problems:
        raise CheckpointError(f"{run_dir}: the paper's task vectors are of the finished experts of one run "
                              f"(App. D.3):\n  " + "\n  ".join(problems))
    return dirs


def initial_weights(edir: Path, init: str):
    """The initial weights' file, to open (``with``): ``init``, else the expert's init.safetensors or step 0."""
    if init:
        return _open_file(Path(init))
    if (edir / "init.safetensors").is_file():
        return _open_file(edir / "init.safetensors")
    if (edir / ckpt.step_name(0)).is_dir():
        return ckpt.Checkpoint(edir / ckpt.step_name(0)).open_model()
    raise CheckpointError(f"{edir}: no initial weights (init.safetensors or step_00000000/); give the shared "
                          f"initialisation with init=<file.safetensors>")


def final_weights(edir: Path, step: int | None = None) -> ckpt.Checkpoint:
    """The expert's last checkpoint, or the one at ``step``."""
    if step is None:
        last = ckpt.load_latest(edir)
        if last is None:
            raise CheckpointError(f"{edir}: no checkpoint (step_*/model.safetensors)")
        return last
    path = edir / ckpt.step_name(step)
    if not path.is_dir():
        kept = [s for s, _ in ckpt.step_dirs(edir)]
        raise CheckpointError(f"reference_step={step}: {edir} has no checkpoint at that step; its steps: "
                              f"{', '.join(map(str, kept)) or 'none'} (train.ckpt_every sets which are kept)")
    return ckpt.Checkpoint(path)


def _label(mod: tuple[str, str]) -> str:
    g, layer = mod
    return TITLES[g] + ("" if layer == "all" else " in/out" if layer == "io" else f" L{int(layer) + 1}")


def _order(mod: tuple[str, str]):
    g, layer = mod
    return GROUPS.index(g), (-1 if layer in ("all", "io") else int(layer))


def plot(mods: list[tuple[str, str]], values: dict, reference: dict, note: str = ""):
    fig, ax = style.figure(style.COLUMN, 0.25 + 0.09 * len(mods))
    colors = {g: c for g, c in zip(GROUPS, style.class_colors(len(GROUPS)))}
    ys = np.arange(len(mods))[::-1]
    ax.boxplot([values[m] for m in mods], positions=ys, orientation="horizontal", widths=0.6, showfliers=True,
               flierprops=dict(markersize=2), medianprops=dict(color="0.3", lw=0.6),
               boxprops=dict(lw=0.5), whiskerprops=dict(lw=0.5), capprops=dict(lw=0.5))
    for y, m in zip(ys, mods):
        size = 8 + (12 * (int(m[1]) + 1) if m[1].isdigit() else 0)
        ax.scatter([np.mean(values[m])], [y], s=size, color=colors[m[0]], zorder=3, edgecolors="none", alpha=0.9)
        if m in reference:
            ax.text(1.02, y, f"{reference[m]:.2f}", transform=ax.get_yaxis_transform(), color="red", fontsize=5,
                    va="center")
    ax.set_yticks(ys, [_label(m) for m in mods])
    ax.set_xlabel("Cosine between experts' task vectors")
    ax.axvline(0.0, color="0.6", lw=0.5, ls=":")
    style.note(fig, note)
    return fig


def run(cfg: TaskVectorsConfig) -> list:
    if not cfg.run:
        raise ConfigError("run=<stage-1 run directory> is required")
    folder = out_dir(cfg.out, "task_vectors")
    experts = expert_dirs(Path(cfg.run), cfg.init)
    ks, dirs = list(experts), list(experts.values())
    with contextlib.ExitStack() as files:  # every file open tensor by tensor (task_vectors)
        shared = files.enter_context(initial_weights(dirs[0], cfg.init)) if cfg.init else None
        inits, finals, steps, early = [], [], [], []
        for edir in dirs:
            inits.append(shared if shared is not None else files.enter_context(initial_weights(edir, "")))
            last = final_weights(edir)
            finals.append(files.enter_context(last.open_model()))
            steps.append(last.step)
            if cfg.reference_step >= 0:
                early.append(files.enter_context(final_weights(edir, cfg.reference_step).open_model()))
        for k, edir in enumerate(dirs):
            check_same_tensors(finals[k], inits[k], f"{edir} (final vs initial)")
            check_same_tensors(finals[k], finals[0], f"{edir} vs {dirs[0]}")
            if early:
                check_same_tensors(early[k], inits[k], f"{edir} (step {cfg.reference_step} vs initial)")
        cos = module_cosines(task_vectors(finals, inits))
        # red reference: cos(tau_k(step N), tau_k(final)) per module, mean over experts k
        own = [module_cosines(task_vectors([e, f], [i, i])) for e, f, i in zip(early, finals, inits)]
    mods = sorted(cos, key=_order)
    K = len(dirs)
    pairs = list(itertools.combinations(range(K), 2))
    values = {m: np.array([cos[m][a, b] for a, b in pairs]) for m in mods}
    reference = {m: float(np.mean([c[m][0, 1] for c in own if m in c])) for m in mods if any(m in c for c in own)}
    prov = provenance(cfg.run)
    rows = [dict(group=m[0], layer=m[1], module=_label(m), expert_a=ks[a], expert_b=ks[b], cosine=float(cos[m][a, b]),
                 **prov) for m in mods for a, b in pairs]
    summary = [dict(group=m[0], layer=m[1], module=_label(m), mean=float(values[m].mean()),
                    min=float(values[m].min()), q25=float(np.quantile(values[m], 0.25)),
                    median=float(np.median(values[m])), q75=float(np.quantile(values[m], 0.75)),
                    max=float(values[m].max()), n_pairs=len(pairs), reference=reference.get(m, ""), **prov)
               for m in mods]
    written = [write_csv(folder / "pairs.csv", rows), write_csv(folder / "modules.csv", summary)]
    written += style.save_figure(plot(mods, values, reference, weights_note(cfg.run)), folder, "fig7_task_vectors")
    print(f"{K} experts (final steps {steps}), {len(pairs)} pairs; mean cosine per module:")
    for s in summary:
        print(f"  {s['module']:<16} {s['mean']:+.3f}  [{s['min']:+.3f}, {s['max']:+.3f}]")
    return written


if __name__ == "__main__":
    command("task_vectors", TaskVectorsConfig, run, __doc__)
