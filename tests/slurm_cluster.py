"""Session fixture `slurm_cluster`: a real single-node SLURM, started by slurm/local_cluster.sh.

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

Starts the cluster once (a no-op if it is already up) and stops it when the last pytest process
using it ends, if a test process started it (pytest-xdist workers share one cluster). Skips where
this machine cannot run it (not root; no SLURM and no apt-get), except when env CI is true: CI
must run the SLURM tests, so there it fails instead.

The job functions below live here, not in a test file, because a SLURM job unpickles its
function by module path in a fresh interpreter: `tests.slurm_cluster` is importable there
(the fixture puts the repository root on the jobs' PYTHONPATH); a test module may not be.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import in_ci

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    slurm_conf: Path
    partition: str
    profile: str  # the slurm/profiles entry that targets this cluster


def _cannot_run_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurm/local_cluster.sh)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def _script(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True)


@contextlib.contextmanager
def _shared(state_dir: Path):
    """Use the cluster for the ``with`` body alongside other pytest processes (pytest-xdist workers, each with
    its own session fixtures): the first starts it, the last one out stops it if a test process started it.

    Each user holds a shared flock on ``<state>.users``; the kernel drops it however the process ends (as
    siren/lock.py relies on), so "nobody else uses it" is an exclusive flock that succeeds. Starting and
    stopping happen under ``<state>.lock``; ``<state>.started`` marks a cluster the tests started."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    base = state_dir.parent / state_dir.name
    started = Path(f"{base}.started")
    with open(f"{base}.users", "a") as users:
        with open(f"{base}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _script("status").returncode != 0:
                out = _script("start")
                if out.returncode != 0:
                    pytest.fail(f"{SCRIPT} start failed:\n{out.stdout}{out.stderr}")
                started.touch()
            fcntl.flock(users, fcntl.LOCK_SH)
        try:
            yield
        finally:
            with open(f"{base}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # from shared: fails while others hold theirs
                    last = True
                except BlockingIOError:
                    last = False
                if last and started.exists():  # a cluster up before the tests stays up
                    _script("stop")
                    started.unlink()


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _cannot_run_reason()
    if reason:
        if in_ci():
            pytest.fail(f"{reason}; CI is set, so the SLURM tests must run, not skip")
        pytest.skip(reason)

    state_dir = Path(os.environ.get("SIREN_SLURM_DIR", "/tmp/siren-slurm"))
    saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PYTHONPATH")}
    with _shared(state_dir):
        os.environ["SLURM_CONF"] = str(state_dir / "etc" / "slurm.conf")
        # sbatch exports this environment to the jobs, which must import tests.slurm_cluster.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
        try:
            yield SlurmCluster(state_dir, state_dir / "etc" / "slurm.conf", partition="debug", profile="local")
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def preempt(job, timeout_s: float = 120) -> None:
    """What SLURM does on preemption, in order: SIGTERM (submitit logs and ignores it), then the SIGUSR2
    that submitit checkpoints and requeues on.

    submitit's own ``job._interrupt()`` sends both back to back, and SLURM may deliver the TERM after
    the USR2: it then kills the ``scontrol requeue`` that the USR2 handler is running (seen once in 2
    test runs on a loaded 2-core machine). Here the USR2 waits until the job has logged the TERM."""
    subprocess.run(["scancel", str(job.job_id), "--signal", "SIGTERM"], check=True)
    log, deadline = Path(job.paths.stderr), time.time() + timeout_s
    while "Bypassing signal SIGTERM" not in (log.read_text() if log.exists() else ""):
        if time.time() > deadline:
            raise TimeoutError(f"job {job.job_id} did not log the SIGTERM within {timeout_s} s ({log})")
        time.sleep(0.2)
    subprocess.run(["scancel", str(job.job_id), "--signal", "USR2"], check=True)


# ---- job functions (run inside SLURM/local jobs) ----


def square(x: int) -> int:
    return x * x


def logged_square(x: int, log_dir: str, sleep_s: float) -> int:
    """square(x), recording its start and end time in log_dir/<x>.txt (to check concurrency)."""
    start = time.time()
    time.sleep(sleep_s)
    Path(log_dir, f"{x}.txt").write_text(f"{start} {time.time()}")
    return x * x


def count_steps(ckpt_dir: str, total: int, sleep_s: float, save_every_step: bool = True) -> int:
    """A toy training loop that resumes from ckpt_dir/step.txt.

    It saves after every step, or (save_every_step=False) only on SIGUSR2, from a handler
    that then calls submitit's, as real training code must. Progress goes to progress.txt,
    and the step each run starts from is appended to starts.txt, so a test sees the resume.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt = ckpt_dir / "step.txt"
    step = int(ckpt.read_text()) if ckpt.exists() else 0
    with open(ckpt_dir / "starts.txt", "a") as f:
        f.write(f"{step}\n")
    if not save_every_step:
        requeue = signal.getsignal(signal.SIGUSR2)

        def save_then_requeue(signum, frame):
            _write_atomic(ckpt, str(step))
            requeue(signum, frame)

        signal.signal(signal.SIGUSR2, save_then_requeue)
    while step < total:
        time.sleep(sleep_s)
        step += 1
        _write_atomic(ckpt_dir / "progress.txt", str(step))
        if save_every_step:
            _write_atomic(ckpt, str(step))
    return step


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # an interrupt never leaves a half-written file
