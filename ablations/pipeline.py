"""Jobs of a grid and their idempotent submission.

A grid expands to a graph of jobs: prepare (shared by every cell with the same data) -> train
(one job per expert, a job array) -> optional stage-2 alignment -> eval. A job is done when its
`done` marker exists (written atomically by the job itself, last), so a re-run submits nothing
that is done; a job whose recorded submission is still pending/running is left alone; a failed
one is reported with its log and resubmitted only with retry=true.

On SLURM every job is submitted at once with `--dependency=afterok:...`, so the pipeline advances
with no process waiting on the login node. `local` and `debug` run each job here as soon as its
dependencies are done.

Two launchers never run or submit the same job: a launcher holds `<root>/launcher.lock` while it
runs or submits (a second one is refused, naming the first), and a job holds `<done>.lock` while
it runs, so a copy of it (an orphan of a killed launcher, a duplicate submission) cannot start;
see siren/lock.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import submitit

from ablations.ledger import (
    LIVE,
    RESUBMITTABLE,
    Job,
    JobState,
    Ledger,
    failed_marker,
    job_lock,
    marker_error,
)
from ablations.steps import Preempted
from siren import cli, io, lock
from siren.errors import SchedulerError

log = logging.getLogger(__name__)



def _launcher_lock(root: Path):
    return lock.hold(root / "launcher.lock", "ablations launcher",
                     f"another launcher is running or submitting jobs in {root}; wait for it (action=status "
                     f"shows progress) or stop it: a re-run continues where it stopped")


def run_marked(step: Callable[..., Any], done: str, kwargs: dict, threads: int, cwd: str) -> Any:
    """What every submitted job runs: the step, then its done marker (only on success). A step
    that raises leaves a failure marker instead, so a re-run can tell failed from interrupted.
    torch gets the job's CPU share (a scheduler without cgroups would let it take every core).
    ``cwd`` is the launcher's folder: a grid's paths are relative to it, wherever a profile's setup lines went."""
    import torch

    cli.setup_logging()  # every job's lines in the one format, also steps that call no command's main()
    try:
        os.chdir(cwd)
    except OSError as e:
        raise SchedulerError(f"this job's paths are relative to the folder its launcher ran in, {cwd}, which this "
                             f"node cannot enter ({e.strerror}); launch from a folder every node mounts at the "
                             "same path") from None
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", threads)))
    failed = failed_marker(done)
    with lock.hold(job_lock(done), f"job {done}", "this job is already running; wait for it or stop it"):
        if Path(done).is_file():  # a second copy (resubmitted while this one ran) finds the work done
            log.info("%s exists: nothing to do", done)
            return None
        try:
            result = step(**kwargs)
        except Preempted:  # checkpointed on a signal: no failure marker, so a plain re-run resumes it
            failed.unlink(missing_ok=True)
            raise
        except Exception as e:
            io.write_json(failed, {"error": f"{type(e).__name__}: {e}", "time": time.time()})
            raise
        failed.unlink(missing_ok=True)
        io.write_json(done, {"finished": time.time(),  # durable: it vouches for the step's outputs
                             "result": result if isinstance(result, (dict, str, int, float)) else None}, durable=True)
    return result


def _levels(jobs: list[Job]) -> list[list[Job]]:
    """Jobs in dependency waves (each wave depends only on earlier ones)."""
    by_key, placed, waves = {j.key: j for j in jobs}, set(), []
    unknown = {d for j in jobs for d in j.deps if d not in by_key}
    if unknown:
        raise ValueError(f"jobs depend on unknown jobs {sorted(unknown)}")
    while len(placed) < len(jobs):
        wave = [j for j in jobs if j.key not in placed and all(d in placed for d in j.deps)]
        if not wave:
            raise ValueError("dependency cycle among " + ", ".join(j.key for j in jobs if j.key not in placed))
        waves.append(wave)
        placed |= {j.key for j in wave}
    return waves


def _waited_on(jobs: list[Job]) -> dict[str, int]:
    """For each job, the longest chain of jobs that wait on it (0 when none does)."""
    below = {j.key: 0 for j in jobs}
    for wave in reversed(_levels(jobs)):  # a job's dependents sit in later waves: its count is final here
        for job in wave:
            for d in job.deps:
                below[d] = max(below[d], below[job.key] + 1)
    return below


def _callable(job: Job) -> Callable[[], Any]:
    from ablations.executors import ResumableJob

    # Every step is requeued on preemption or a time limit and goes on from what it wrote: training and stage 2
    # from their checkpoints, prepare and latents from their cached encodings, an evaluation from its clips
    # (generation resumes batch by batch) and its embedding cache; a calibration row writes the same clips again.
    return ResumableJob(run_marked, step=job.fn, done=str(job.done), kwargs=job.kwargs, threads=job.cpus,
                        cwd=os.getcwd())


def _executor(kind: str, root: Path, profile, job: Job, max_parallel: int, python: str | None = None):
    from ablations.executors import make_executor

    return make_executor(kind, root / "logs", profile, name=job.key, timeout_min=job.timeout_min, gpus=job.gpus,
                         cpus=job.cpus, mem_gb=job.mem_gb, array_parallelism=max_parallel, python=python)


def submit_slurm(jobs: list[Job], root: Path, profile, retry: bool) -> dict[str, JobState]:
    """Submit every missing job at once, chained with afterok dependencies (jobs sharing an `array`
    name, e.g. the experts of one model, go as one job array); returns each job's state."""
    with _launcher_lock(root):
        return _submit_slurm(jobs, root, profile, retry)


def _submit_slurm(jobs: list[Job], root: Path, profile, retry: bool) -> dict[str, JobState]:
    from ablations.executors import check_limits

    check_limits(profile, [j.timeout_min for j in jobs])
    ledger, states = Ledger(root), {}
    ledger.track(jobs)
    for wave in _levels(jobs):
        groups: dict[str, list[Job]] = {}
        for job in wave:
            st = ledger.state(job)
            # retry: only what has ended without its done marker; UNKNOWN (no sacct row yet, slurmdbd down) may
            # still run, and a second copy would overwrite the ledger record its dependents wait on
            resubmit = st.state == "MISSING" or (retry and st.state in RESUBMITTABLE)
            waiting = [d for d in job.deps if states[d].state not in LIVE | {"DONE"}]
            if resubmit and not waiting:
                groups.setdefault(job.array or job.key, []).append(job)
            else:
                states[job.key] = JobState(job.key, "BLOCKED", log=f"needs {', '.join(waiting)}") \
                    if resubmit else st
        for name, group in groups.items():
            ex = _executor("slurm", root, profile, group[0], max_parallel=None)
            ex.update_parameters(job_name=name)
            live = sorted({states[d].job_id for j in group for d in j.deps if states[d].state in LIVE})
            if live:
                ex.update_parameters(dependency="afterok:" + ":".join(live))
            submitted = []
            with held_signals():  # sbatch and the record of what it took, whole
                try:
                    with ex.batch():  # one sbatch --array for the group (a plain job for a group of one)
                        for job in group:
                            submitted.append((job, ex.submit(_callable(job))))
                except submitit.core.utils.FailedJobError as e:  # sbatch's own words; what went before is recorded
                    raise SchedulerError(f"sbatch refused {name} ({len(group)} job(s)): "
                                         f"{' '.join(str(e).split())[:600]}. The jobs submitted before it are "
                                         f"recorded: once SLURM takes jobs, the same command submits only the "
                                         f"rest") from None
                for job, sj in submitted:
                    ledger.record(job.key, "slurm", sj, root / "logs")
                    states[job.key] = JobState(job.key, "PENDING", str(sj.job_id), str(sj.paths.stderr),
                                               submitted=True)
    return states


@contextlib.contextmanager
def held_signals(signums=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """Ctrl-C, SIGTERM and a lost login session (SIGHUP) wait until the body is done, then act as before: a launcher
    stopped between sbatch and the ledger's record left jobs SLURM runs but no one knows of, submitted again by
    the next launcher. (sbatch itself, a new program, gets them as usual: stopped, it submits nothing.)"""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's to set
        yield
        return
    got = []
    before = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if got:
            signal.raise_signal(got[0])


def run_local(jobs: list[Job], root: Path, kind: str, retry: bool, max_parallel: int,
              warm: bool = True) -> dict[str, JobState]:
    """local/debug: run the graph here, waiting (a workstation has no scheduler). A job starts as soon as
    its dependencies are done and fewer than ``max_parallel`` jobs run (no waves: nothing waits for the
    slowest expert of the grid); among ready jobs, those that others wait on go first. ``warm``: local
    jobs are forked from a server that imported torch and the harness once (ablations/warm.py)."""
    from ablations import warm as warm_start

    todo = [j for j in jobs if not j.done.is_file()]
    server = contextlib.nullcontext()
    # submitit's local executor hides the GPUs from a job that asks for none
    if kind == "local" and todo and not any(j.gpus for j in todo) and warm_start.cuda_visible():
        log.info("a CUDA device is visible but the jobs ask for none: they run on the CPU; gpus=1 gives each "
                 "training, evaluation and calibration job the first GPU (set.eval.device=cuda to evaluate on it)")
    # every local GPU job gets the first GPU(s): max_parallel of them share it (fine for the demo's models)
    gpu_jobs = [j for j in todo if j.gpus]
    if kind == "local" and len(gpu_jobs) > 1 and max_parallel > 1:
        log.info("up to %d GPU jobs at a time share the same first GPU(s) (max_parallel=%d); max_parallel=1 gives "
                 "each job its GPU(s) alone", min(max_parallel, len(gpu_jobs)), max_parallel)
    if warm and kind == "local" and todo:
        demo = any((j.kwargs.get("cfg") or {}).get("weights") == "demo" for j in todo)
        server = warm_start.server(root / "logs" / "warm.log",
                                   deferred=("ablations.warm:demo_networks",) if demo else ())
    with _launcher_lock(root), _job_env(), server as address:
        return _run_local(jobs, root, kind, retry, max_parallel, warm_start.python_prefix(address))


# Process settings for the local jobs. The warm server and cold jobs inherit the launcher's environment, and glibc,
# libgomp and tqdm read these once, at process start; only where memory comes from, how idle threads wait and how
# often a progress bar is drawn change, not any number computed. A user's own values win.
JOB_ENV = {
    # glibc malloc. By default big blocks are mmapped and the heap's top is trimmed (thresholds from 128 KB, raised
    # dynamically), so a step's next 10 MB logits or gradient can fault in fresh zeroed pages (halved minor faults
    # in a 1-12 expert's run); here blocks under 32 MB stay in the heap and it is not trimmed below 1 GiB. In paired
    # runs on 2 cores a 1-12 demo expert's step ran 13-21% and the eval backbones ~10% faster (README, Measured).
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    # OpenMP (torch's intra-op threads): a thread that waits at the end of a parallel region sleeps instead of
    # spinning. prepare's 2 threads share the 2 cores with a one-thread calibration job: spinning, the waiting
    # thread held a core the other needed (prepare 113 s beside a busy thread, 68 s alone); sleeping, prepare took
    # 93 s and the busy thread kept its full core. Alone, the same 68 s and the same codes (README, Measured).
    "OMP_WAIT_POLICY": "PASSIVE",
    # tqdm (read when it is imported): a job's log is a file, where every redraw of a progress bar stays, 132-332
    # of them per demo expert on one line; here at most one every 30 s.
    "TQDM_MININTERVAL": "30",
}


@contextlib.contextmanager
def _job_env():
    saved = {k: os.environ.get(k) for k in JOB_ENV}
    for k, v in JOB_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_local(jobs: list[Job], root: Path, kind: str, retry: bool, max_parallel: int,
               python: str | None = None) -> dict[str, JobState]:
    # Jobs that others wait on start first (plan order among equals), so training runs before evaluations
    # (the leaves): the evals then read the reference embeddings the first calibration row cached, and run
    # in pairs at the end rather than one alone on a 2-core machine (demo Table 6: 8:21 -> 8:02; at batch 8,
    # where two trainings at once contend for the 2 vCPUs, 9:34 -> 10:11: README, Measured / Demo world).
    # _levels also makes unknown dependencies and cycles errors before anything runs.
    below = _waited_on(jobs)
    ledger, states, pending, running = Ledger(root), {}, sorted(jobs, key=lambda j: -below[j.key]), []
    progress = _Progress(_to_start(jobs, ledger, retry), root / "logs")
    try:
        while pending or running:
            for job in list(pending):
                if any(d not in states for d in job.deps):
                    continue  # a dependency has not finished
                st, bad_deps = ledger.state(job), [d for d in job.deps if states[d].state != "DONE"]
                if bad_deps or not _startable(st, retry):
                    states[job.key] = JobState(job.key, "BLOCKED", log=f"needs {', '.join(bad_deps)}") \
                        if bad_deps and st.state != "DONE" else st
                    pending.remove(job)
                elif len(running) < max_parallel:
                    sj = _executor(kind, root, None, job, max_parallel, python).submit(_callable(job))
                    ledger.record(job.key, kind, sj, root / "logs")
                    running.append((job, sj, time.time()))
                    pending.remove(job)
                    if kind == "debug":  # submitit's debug jobs run in this process when asked for their result
                        break
            finished = [r for r in running if kind == "debug" or r[1].done()]
            for job, sj, started in finished:
                running.remove((job, sj, started))
                try:
                    sj.result()
                    # local job ids are PIDs, and a killed job's result is read from <pid>_0_result.pkl: an earlier
                    # job of the same PID left one there. Done is the marker the job writes last, nothing else
                    if not job.done.is_file():
                        raise RuntimeError(f"the job ended without writing {job.done} (killed: by the kernel's "
                                           f"out-of-memory killer?); the result read was an earlier job's")
                    states[job.key] = JobState(job.key, "DONE", str(sj.job_id), submitted=True)
                except Exception as e:  # the job's own error; its log has the traceback
                    other = lock.holder(job_lock(job.done))
                    if other:  # refused its lock: a copy started by a launcher killed before this one (its jobs go on)
                        states[job.key] = JobState(job.key, "RUNNING", str(sj.job_id),
                                                   f"running: {lock.describe(other)}", submitted=True)
                    else:
                        states[job.key] = JobState(job.key, "FAILED", str(sj.job_id),
                                                   f"{sj.paths.stderr} ({_job_error(job, e, started)})", submitted=True)
                progress.finished(job, states[job.key], time.time() - started, below[job.key])
            if running and not finished:
                time.sleep(0.1)  # at 0.5 s a freed slot idled ~0.25 s on average, per job (33 in the demo Table 6)
    except KeyboardInterrupt:  # Ctrl-C: stop the running jobs too (training jobs resume from checkpoints)
        for _, sj, _ in running:
            if not sj.done():
                sj.cancel(check=False)
        raise
    return states


def _startable(st: JobState, retry: bool) -> bool:
    """Not done nor running elsewhere, and never run (or interrupted), or failed and retried."""
    return st.state not in LIVE | {"DONE"} and (st.state == "MISSING" or retry)


def _to_start(jobs: list[Job], ledger: Ledger, retry: bool) -> int:
    """How many jobs this call starts if none of them fails: startable, with every dependency done or started."""
    will: dict[str, str] = {}
    for wave in _levels(jobs):
        for job in wave:
            st = ledger.state(job)
            startable = _startable(st, retry) and all(will[d] != "no" for d in job.deps)
            will[job.key] = "done" if st.state == "DONE" else "start" if startable else "no"
    return sum(v == "start" for v in will.values())


def _job_error(job: Job, e: Exception, started: float) -> str:
    """The step's own error, one line: from its failure marker (submitit's error for a local job ends in its log
    paths, not in what went wrong), else the last line of what the executor raised (a job killed before it could
    write the marker)."""
    failed = failed_marker(job.done)
    if failed.is_file() and failed.stat().st_mtime >= started - 1:  # written by this run, not a stale one
        text = marker_error(failed)
    else:
        text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
    return " ".join(text.split())[:300]


class _Progress:
    """One line as each local job ends, so a run of many minutes shows how far it is and a failure at once
    (the table at the end says the same for every job)."""

    def __init__(self, todo: int, logs: Path):
        self.todo, self.ended = todo, 0
        if todo:
            log.info("%d job(s) to run here; a line as each one ends; their logs: %s", todo, logs)

    def finished(self, job: Job, st: JobState, seconds: float, waited_on: int) -> None:
        self.ended += 1
        name = f"{job.key} ({job.rows})" if job.rows else job.key
        if st.state == "DONE":
            log.info("[%d/%d] %s done in %.0f s", self.ended, self.todo, name, seconds)
            return
        if st.state == "RUNNING":
            log.warning("[%d/%d] %s is already %s; this run does not wait for it (run the grid again when it ends)",
                        self.ended, self.todo, name, st.log)
            return
        after = " the jobs that need it will not start;" if waited_on else ""
        log.error("[%d/%d] %s failed after %.0f s:%s retry=true runs it again. %s", self.ended, self.todo, name,
                  seconds, after, st.log)
