"""The jobs of a grid as records: each job, where it stands (its done and failure markers, its lock, the ledger of
its submission: <root>/jobs/<key, '/' as '__'>.json) and the cancelling of those SLURM may still run. ablations.pipeline
submits and runs them.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from siren import io, lock
from siren.errors import DataError, SchedulerError

# PREEMPTED is final where PreemptMode=CANCEL (with REQUEUE the job shows REQUEUED/PENDING); held and stopped
# jobs are live (a person releases them)
FINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "INTERRUPTED",
             "PREEMPTED", "REVOKED"}
LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "QUEUED",
        "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "STOPPED", "SIGNALING", "STAGE_OUT"}
RESUBMITTABLE = FINAL_BAD | {"COMPLETED", "PREEMPTED"}  # ended (a done marker would read DONE), per sacct


@dataclass
class Job:
    key: str  # unique and stable: "data-<id>", "stage1-<id>/expert_<k>", "<cell>/align", "<cell>/eval", ...
    fn: Callable[..., Any]  # module-level function (picklable by reference)
    kwargs: dict
    done: Path  # marker the job writes last, on success
    deps: list[str] = field(default_factory=list)
    gpus: int = 0
    cpus: int = 1
    mem_gb: float = 4
    timeout_min: int = 60
    array: str = ""  # jobs of one name (with equal resources and dependencies) go to SLURM as one job array
    output: Path | None = None  # what the done marker vouches for (a folder or file): deleted, the job is not done
    rows: str = ""  # the table rows whose outcome it is (evaluations, alignments), for the status lines
    # prepare, latents: a retry runs it again when a job reading its files failed (it re-encodes a damaged entry,
    # which its done marker would otherwise vouch for until someone deleted the marker by hand)
    recheck: bool = False


@dataclass
class JobState:
    key: str
    state: str  # DONE | PENDING | RUNNING | FAILED ... | MISSING (never submitted)
    job_id: str = ""
    log: str = ""
    submitted: bool = False  # by this launcher call


def failed_marker(done: str | Path) -> Path:
    return Path(f"{done}.failed")


def job_lock(done: str | Path) -> Path:
    return Path(f"{done}.lock")


def marker_error(failed: Path) -> str:
    """The error a failed job wrote in its marker (or that the marker is unreadable: the job still failed)."""
    try:
        return str(io.read_json(failed, "")["error"])
    except (DataError, KeyError, TypeError):
        return f"failed; its failure marker {failed} is unreadable, see the job's log"


class Ledger:
    """Where submissions are recorded: <root>/jobs/<key, '/' as '__'>.json holds executor, job id and folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._slurm: dict[str, submitit.SlurmJob] = {}  # by job id, registered with submitit's sacct watcher

    def track(self, jobs: list[Job]) -> None:
        """Register every recorded, unfinished SLURM job with submitit's watcher before any state is asked, so one
        sacct call answers for all (asked one at a time, each newly registered job forced a call: up to one per job)."""
        for job in jobs:
            if not job.done.is_file() and (rec := self.get(job.key)) and rec["executor"] == "slurm":
                self._slurm_job(rec)

    def _slurm_job(self, rec: dict) -> submitit.SlurmJob:
        if rec["job_id"] not in self._slurm:
            self._slurm[rec["job_id"]] = submitit.SlurmJob(folder=Path(rec["folder"]), job_id=rec["job_id"])
        return self._slurm[rec["job_id"]]

    def _path(self, key: str) -> Path:
        return self.root / "jobs" / f"{key.replace('/', '__')}.json"

    def record(self, key: str, executor: str, job: submitit.Job, folder: Path) -> None:
        io.write_json(self._path(key), {"executor": executor, "job_id": str(job.job_id), "folder": str(folder),
                                        "submitted": time.time()})

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.is_file():
            return None
        fix = "delete it and run again: the job then counts as never submitted (a finished one keeps its done marker)"
        rec = io.read_json(p, fix)
        # what record() wrote: a record damaged or edited into other shapes was a KeyError, and its job id goes
        # to scancel (an id like --me would cancel every job of the user)
        if not (isinstance(rec, dict) and isinstance(rec.get("executor"), str) and isinstance(rec.get("folder"), str)
                and isinstance(rec.get("job_id"), str) and re.fullmatch(r"\w+", rec["job_id"], re.ASCII)):
            raise DataError(f"{p}: not a job record (executor, job_id of letters, digits and _, folder); {fix}")
        return rec

    def state(self, job: Job) -> JobState:
        if job.done.is_file():
            rec = self.get(job.key) or {}
            if job.output is not None and not job.output.exists():  # the marker alone would be DONE for good
                return JobState(job.key, "FAILED", rec.get("job_id", ""),
                                f"{job.done} exists but its output {job.output} is gone: delete {job.done} and run "
                                f"the grid again")
            return JobState(job.key, "DONE", rec.get("job_id", ""), "")
        rec = self.get(job.key)
        running = lock.holder(job_lock(job.done))
        if running is not None:  # e.g. left running by a launcher that was killed
            return JobState(job.key, "RUNNING", (rec or {}).get("job_id", ""), f"running: {lock.describe(running)}")
        if rec is None:
            return JobState(job.key, "MISSING")
        jid = rec["job_id"]
        if rec["executor"] == "slurm":
            if shutil.which("sacct") is None:  # submitit would warn once per job and answer UNKNOWN
                return JobState(job.key, "UNKNOWN", jid, "no sacct on PATH: ask from the cluster's login node")
            sj = self._slurm_job(rec)
            return JobState(job.key, (sj.state or "UNKNOWN").split()[0], jid, str(sj.paths.stderr))
        # local/debug jobs do not outlive their launcher (a left-over one holds its lock, above):
        # a job with no outcome was interrupted
        failed = failed_marker(job.done)
        if failed.is_file():
            return JobState(job.key, "FAILED", jid, marker_error(failed))
        return JobState(job.key, "MISSING", jid, "interrupted; will run again")


def current_states(jobs: list[Job], root: Path) -> dict[str, JobState]:
    ledger = Ledger(root)
    ledger.track(jobs)
    return {j.key: ledger.state(j) for j in jobs}


def reopen_for_retry(jobs: list[Job], root: Path) -> list[str]:
    """``retry=true``: the done ``recheck`` jobs with a job depending on them that failed on its data (a DataError in
    its failure marker: a damaged prepared file; not a time limit, a cancel or an out-of-memory kill), their markers
    deleted so they run again before it (cached work is read, not redone); returns their keys."""
    states = current_states(jobs, root)
    failed = {j.key for j in jobs if states[j.key].state in FINAL_BAD | {"FAILED"}
              and failed_marker(j.done).is_file() and marker_error(failed_marker(j.done)).startswith("DataError")}
    again = [j for j in jobs if j.recheck and states[j.key].state == "DONE"
             and any(j.key in d.deps for d in jobs if d.key in failed)]
    for j in again:
        j.done.unlink()
    return [j.key for j in again]


def cancel_slurm(jobs: list[Job], root: Path) -> int:
    """scancel every recorded SLURM job that may still run: not done and not in a final state (one that sacct
    does not list yet counts as running); returns how many. A second call, or one after the jobs ended, cancels
    nothing and says so."""
    import subprocess

    ledger = Ledger(root)
    ledger.track(jobs)
    ids = [rec["job_id"] for j in jobs if (rec := ledger.get(j.key)) and rec["executor"] == "slurm"
           and ledger.state(j).state not in FINAL_BAD | {"DONE", "COMPLETED"}]
    if not ids:
        return 0
    try:
        out = subprocess.run(["scancel", "--", *ids], capture_output=True, text=True)
    except FileNotFoundError:
        raise SchedulerError("action=cancel needs scancel on PATH: run it where the jobs were submitted from "
                             "(the cluster's login node)") from None
    if out.returncode:
        raise SchedulerError(f"scancel refused to cancel {len(ids)} job(s): "
                             f"{' '.join((out.stderr or out.stdout).split())[:600]}")
    return len(ids)
