"""What every training loop of the project runs on: processes, devices, precision, stop signals,
the run log, parameter groups and the learning-rate schedule. Stage 1 (siren.train) and stage 2
(siren.rl.alignment) both use these; neither imports the other.

Preemption protocol (``StopRequest``): SIGUSR2 (and SIGTERM outside SLURM) sets a flag; the loop writes a
checkpoint at the next step boundary and the command exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL) so the
launcher requeues it; a first Ctrl-C does the same but exits as an interrupt. Restarting the same command
resumes from the checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from siren import io
from siren.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" -> the launcher requeues
PRECISIONS = ("auto", "bf16", "fp32")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# ---------------------------------------------------------------------------- devices and precision

def check_device(name: str, key: str = "device") -> None:
    """Config-time check of a device name (auto | cpu | cuda | cuda:N)."""
    if not _DEVICE.match(str(name)):
        raise ConfigError(f"{key}={name!r} is not a device this harness runs on; use auto, cpu, cuda or cuda:N")


def check_precision(name: str, key: str = "precision") -> None:
    if name not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got {name!r}")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else the CPU; ``cuda`` -> this rank's GPU."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but CUDA is not available on this machine; use device=cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA; fp32 otherwise."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ---------------------------------------------------------------------------- processes

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun (RANK/WORLD_SIZE env) or a multi-task submitit job -> process group; else one process."""
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return Dist()
    # collectives follow their tensors' device: a train.device=cpu run on a GPU node sent CPU tensors to NCCL
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def any_rank(flag: bool, ranks: Dist, device: torch.device) -> bool:
    """A flag raised by any process (a signal, a non-finite loss) is raised for all of them."""
    return any_ranks([flag], ranks, device)[0]


def any_ranks(flags: list[bool], ranks: Dist, device: torch.device) -> list[bool]:
    """``any_rank`` of several flags in one collective (the training loop asks two questions per step)."""
    if ranks.world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def derive_seed(seed: int, a: int = 0, b: int = 0) -> int:
    """One integer seed from a base seed and up to two counters (epoch, rank, step, ...): the one
    place the project mixes seeds, so two values of the same stream never collide by accident (two streams
    given the same counters share a seed: stage 2's prompt order of epoch e and its rollouts of step e).

    ``seed * 1_000_003 + a * 7919 + b`` is one-to-one while 0 <= b < 7919 and a * 7919 + b < 1_000_003,
    which holds for every stream of the demo grids and the tests (kept, so their numbers stay). Past it,
    at paper scale, it would collide (step 7919 of counter a is step 0 of a + 1: the stage-2 rollouts of
    step 7919 would reuse the fixed-prompt probe's seed), so those are hashed into [2^62, 2^63); so are
    layout values from 2^62 on (a seed derived again from a hashed one), so every result fits torch's
    64-bit seeds and the two ranges never meet."""
    value = seed * 1_000_003 + a * 7919 + b
    if seed >= 0 and 0 <= b < 7919 and 0 <= a * 7919 + b < 1_000_003 and value < 1 << 62:
        return value
    digest = hashlib.blake2b(f"{seed},{a},{b}".encode(), digest_size=8).digest()
    return (1 << 62) | (int.from_bytes(digest, "little") >> 2)


# ---------------------------------------------------------------------------- stop signals

class StopRequest:
    """SIGUSR2/SIGTERM handler: remembers the signal; the loop checkpoints at the next step boundary.
    Outside SLURM a first Ctrl-C (SIGINT) does the same, then ends the command as an interrupt once the checkpoint
    is written (a second Ctrl-C stops at once): stopping at once lost every step since the last periodic checkpoint.

    A handler installed before ours (submitit's requeue handler) is called after the
    checkpoint is safely written, so submitit still requeues a job it launched. Inside a SLURM
    job only SIGUSR2 stops the loop: preemption and `scancel --signal` deliver SIGTERM just before
    SIGUSR2, and stopping on the SIGTERM would exit before submitit requeues. There a SIGTERM asks
    for a checkpoint at the next step boundary and the loop goes on (``save_due``): a SIGUSR2
    after it still requeues, and a cluster that preempts with SIGTERM then SIGKILL loses only the
    steps since that checkpoint, not those since the last periodic one."""

    def __init__(self):
        self.signum: int | None = None
        self.preempted = False  # set by the loop once it has checkpointed and is leaving
        self.save_requests = 0  # inside SLURM, SIGTERMs: checkpoint and go on
        self._answered = 0
        self.previous: dict[int, Any] = {}
        self.in_slurm = "SLURM_JOB_ID" in os.environ
        self.signals = (signal.SIGUSR2, signal.SIGTERM) + (() if self.in_slurm else (signal.SIGINT,))

    def __call__(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum is not None:  # asked twice: now
                raise KeyboardInterrupt
            log.warning("Ctrl-C: stopping after this step's checkpoint (Ctrl-C again stops at once, losing the steps "
                        "since the last checkpoint)")
            self.signum = signum
        elif self.in_slurm and signum == signal.SIGTERM:
            self.save_requests += 1
            previous = self.previous.get(signum)
            if callable(previous):  # submitit's, which logs the SIGTERM and lets the job go on
                previous(signum, frame)
        else:
            self.signum = signum

    def save_due(self) -> bool:
        """Whether a SIGTERM asked for a checkpoint since the last call (one arriving during it counts next time)."""
        n = self.save_requests
        due, self._answered = n > self._answered, n
        return due

    def install(self) -> None:
        for s in self.signals:
            if s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN:  # a background job's: it stays ignored
                continue
            self.previous[s] = signal.signal(s, self)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()

    def chain(self) -> None:
        """Run the pre-existing handler of the caught signal (after our checkpoint)."""
        prev = self.previous.get(self.signum)
        self.restore()
        if callable(prev):
            prev(self.signum, None)


@contextlib.contextmanager
def stop_on_signal(install: bool = True) -> Iterator[StopRequest]:
    """The loop's signal handling: on leaving, hand a caught signal on to the previous handler
    when the loop stopped for it (``stop.preempted``), else just restore the handlers."""
    stop = StopRequest()
    if install:
        stop.install()
    try:
        yield stop
    finally:
        stop.chain() if stop.preempted and stop.signum is not None else stop.restore()


# ---------------------------------------------------------------------------- run log

class RunLog:
    """JSONL (one object per logged step) + TensorBoard scalars, main process only.

    On resume the entries after the checkpoint's step are dropped (they are recomputed), so
    log.jsonl always reads as one uninterrupted run."""

    def __init__(self, folder: Path, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(folder) / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _json_step(line) <= start_step]
            io.write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(folder) / "tb"), purge_step=start_step + 1)

    def write(self, entry: dict) -> None:
        if not self.enabled:
            return
        with io.open_append(self.path) as f:
            f.write(json.dumps(entry) + "\n")
        prefix = "val/" if entry.get("val") else "train/"
        for k, v in entry.items():
            if k not in ("step", "val") and isinstance(v, (int, float)):
                self.tb.add_scalar(prefix + k, v, entry["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warn_other_device(saved: str | None, device: torch.device, what: str) -> None:
    """A run resumed on another device type goes on, but not to the numbers it would have reached: bf16 autocast
    (precision=auto) is CUDA's only, and the devices draw other random numbers."""
    if saved and saved != device.type:
        log.warning("%s: checkpointed on %s, resumed on %s: the run goes on, but its numbers from here are not those "
                    "of an uninterrupted run (precision=auto, kernels, random draws)", what, saved, device.type)


def _json_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (half-written) line is dropped


def read_log(folder: str | os.PathLike) -> list[dict]:
    """The entries of ``folder/log.jsonl`` (a stage-1 expert directory, or a stage-2 ``rl/``)."""
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- optimisation

NO_DECAY = ("bias", "sos", "pos")  # biases (the code embeddings' [12, d] too), sos vectors, learned positions


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on norms, biases, sos, positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (decay if p.ndim >= 2 and leaf not in NO_DECAY else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimiser step ``step`` (0-based) for a config with lr, min_lr, warmup_steps,
    steps, schedule and decay_frac: linear warmup to lr, then either a cosine over all remaining steps that
    lands on min_lr at the last step (``steps - 1``), as the authors' code does, or (wsd) held at lr until the
    last decay_frac of the steps, then linearly towards min_lr at ``steps``. A warmup longer than the run is
    cut to it, as the authors' train command does (``min(warmup_steps, total_steps)``): the run reaches lr."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "wsd":
        start = max(warmup, cfg.steps * (1.0 - cfg.decay_frac))
        progress = max(0.0, step - start) / max(1.0, cfg.steps - start)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, progress)
    decay_steps = cfg.steps - warmup
    if decay_steps <= 1:
        return cfg.min_lr
    progress = min(1.0, (step - warmup) / (decay_steps - 1))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout this code runs from, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    # GIT_OPTIONAL_LOCKS=0: --dirty refreshes the index under .git/index.lock otherwise, a write into the checkout
    # that a git command of the user's at that moment fails on
    git = dict(capture_output=True, text=True, timeout=10, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    try:
        # this code's own checkout (also as a folder of a larger repository); installed into site-packages inside
        # another project's checkout, the files are not tracked there and git would describe that project
        if subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", "--", "siren/runtime.py"],
                          **git).returncode == 0:
            r = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"], **git)
            if r.returncode == 0 and r.stdout.strip():
                return f"git {r.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"siren-harness {metadata.version('siren-harness')}"
    except metadata.PackageNotFoundError:
        return "unknown"
