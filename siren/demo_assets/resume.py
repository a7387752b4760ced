"""Resuming the demo codec's build. ``python -m siren.demo_assets train`` runs for one to two hours on
a 2-core CPU; stopped part way (Ctrl-C, preemption, a crash), the same command restarts from the last
finished stage and, inside a stage, from its last checkpoint. Resumed in the same process it ends with the
same bits as a run never stopped (``tests/test_demo_codec.py``); in a new process, after stage 2 or inside
stages 3-4, with other last bits, which training then grows (README, Known gaps: the stage's inputs hash the
same in both; a process's earlier work moves some kernel's rounding).

Everything lives in one work folder beside the output file (``<out>.build/``), removed when the file
is written. A stage file or checkpoint is used only when its key (the stage, the recipe keys that
shape it, the sha256 of the file it started from, the torch version and CPU) equals this run's; another
recipe's (or machine's) is replaced, with a warning naming it."""
from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from siren.errors import CheckpointError
from siren.io import atomic_path, load_torch_file

log = logging.getLogger(__name__)

# the recipe keys each stage's result depends on (stages 3 and 4 are also keyed by their start file); threads and
# device too: the same seed trains to other weights on 1 and 2 threads (docs/demo/codec.md, "Stage 1's plateau")
_RUN = ("seed", "n_train", "n_test", "segment_s", "batch", "threads", "device")
_STAGE_1 = (*_RUN, "ae_steps", "ae_lr", "ae_warmup")
STAGE_KEYS = {
    1: _STAGE_1,
    2: (*_STAGE_1, "kmeans_iters", "fp16"),  # the quantizers are fitted to stage 1's encoder
    3: (*_RUN, "ft_steps", "ft_lr", "fp16"),
    4: (*_RUN, "ft_lr", "decay_steps", "fp16"),
}


def work_dir(out: Path, init: str = "") -> Path:
    """``<out>.build/``; a build on ``init=`` keeps its own (``<out>.build-init/``), so it neither resumes from
    nor, when it ends, deletes a from-scratch build's stages to the same ``out``."""
    return out.parent / f"{out.name}.build{'-init' if init else ''}"


def machine() -> dict:
    """What besides the recipe decides a stage's bits: the torch version and the CPU (its vectorised kernels); a
    build stopped on one machine and resumed on another kind redoes its stages rather than mix them."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:  # Linux: "AMD EPYC, family 25 model 17" (the model name alone does not tell the AMD kinds apart)
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info.get('model name', cpu)}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    except OSError:  # macOS: platform.processor() is "arm" on every Apple Silicon Mac
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 check=True, timeout=10).stdout.strip() or cpu  # "Apple M1", "Apple M3 Pro"
        except (OSError, subprocess.SubprocessError):
            pass
    return {"torch": str(torch.__version__), "cpu": cpu}  # str: the stage files' safe loader refuses TorchVersion


def stage_key(cfg, stage: int, start_sha256: str | None = None) -> dict:
    return {"stage": stage, "recipe": {k: getattr(cfg, k) for k in STAGE_KEYS[stage]}, "from": start_sha256,
            "machine": machine()}


def finished(path: Path, key: dict) -> bool:
    """Whether ``path`` is a stage file this run would write (its metadata's ``build_key``)."""
    if not path.is_file():
        return False
    try:
        found = load_torch_file(path).get("metadata", {}).get("build_key")
    except CheckpointError as e:  # cut short by a crash (its write is atomic, not durable): done again
        log.warning("stage %d: %s; redoing the stage", key["stage"], e)
        return False
    if found == key:
        log.info("stage %d: kept %s, written by an earlier run of this recipe", key["stage"], path)
        return True
    log.warning("stage %d: %s was written by another recipe or start file (%s, this run %s); redoing the stage",
                key["stage"], path, found, key)
    return False


@dataclass
class Checkpoint:
    """A stage's training state every ``every`` steps: weights, optimiser, schedule, both generators
    (the crops' and torch's global one, from which DAC draws the quantizer dropout) and the losses."""
    path: Path
    key: dict
    every: int

    def restore(self, model, opt, sched, gen: torch.Generator) -> tuple[int, list[float]]:
        if not self.path.is_file():
            return 0, []
        try:
            state = load_torch_file(self.path)
        except CheckpointError as e:
            log.warning("stage %d: %s; the stage starts afresh", self.key["stage"], e)
            return 0, []
        if state.get("key") != self.key:
            log.warning("%s is another recipe's checkpoint (%s, this run %s); the stage starts afresh",
                        self.path, state.get("key"), self.key)
            return 0, []
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        log.info("stage %d: resumed at step %d from %s", self.key["stage"], state["step"], self.path)
        return state["step"], state["losses"]

    def save(self, step: int, model, opt, sched, gen: torch.Generator, losses: list[float]) -> None:
        state = {"key": self.key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "gen": gen.get_state(), "rng": torch.get_rng_state(), "losses": losses}
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:  # records named "archive/", not after tmp's name
            torch.save(state, f)


def run_steps(step: Callable[[], float], steps: int, ckpt: Checkpoint, model, opt, sched, gen: torch.Generator,
              desc: str) -> list[float]:
    """``steps`` calls of ``step`` (one optimiser step, returning its loss), resumed from ``ckpt`` and
    checkpointed to it every ``ckpt.every`` steps; returns the loss of every step."""
    start, losses = ckpt.restore(model, opt, sched, gen)
    for s in tqdm(range(start, steps), desc=desc, unit="step", initial=start, total=steps):
        losses.append(step())
        if (s + 1) % ckpt.every == 0 and s + 1 < steps:
            ckpt.save(s + 1, model, opt, sched, gen, losses)
    return losses
