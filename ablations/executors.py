"""Where ablation jobs run: SLURM cluster profiles, submitit executors, resumable jobs.

    profile = load_profile("local")                       # slurm/profiles/local.yaml
    ex = make_executor("slurm", folder, profile, name="train", timeout_min=60, gpus=1)
    job = ex.submit(ResumableJob(train_expert, config=cfg))
    job.result()

`make_executor` returns submitit's own executors (SlurmExecutor, a LocalExecutor that bounds
concurrency, DebugExecutor), so `update_parameters` on them takes sbatch option names
(`partition=...`), not AutoExecutor's `slurm_`-prefixed ones.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit
import yaml
from submitit.helpers import Checkpointable, DelayedSubmission

from siren import io
from siren.errors import ConfigError, SchedulerError

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
KINDS = ("slurm", "local", "debug")
# SLURM sends SIGUSR2 this long before the time limit (up to 60 s earlier still: its event
# resolution), leaving time to write a checkpoint of a large model to a network filesystem
# (a profile's signal_delay_s sets another: a 3.3B model's checkpoint on a slow filesystem).
SIGNAL_DELAY_S = 120
# submitit's default number of timeouts a checkpointable job survives.
SPARE_TIMEOUTS = 3

# Profile keys and the YAML types they accept (null always means "not set").
_KEY_TYPES: dict[str, type | tuple[type, ...]] = {
    "partition": str,
    "account": str,
    "qos": str,
    "gpus_per_node": int,
    "gpu_type": str,
    "cpus_per_task": int,
    "mem_gb": (int, float),
    "timeout_min": int,
    "signal_delay_s": int,
    "setup": list,
    "additional_parameters": dict,
}
_NUMBERS = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "signal_delay_s")
# sbatch options additional_parameters may not set ('-' and '_' spellings alike): those the harness sets itself
# (requeue, the time limit, the afterok chain between a grid's jobs, names, arrays,
# logs) and those a profile key sets; either way the profile's value replaced the harness's without a word.
_RESERVED = {"time", "requeue", "no_requeue", "kill_on_invalid_dep", "dependency", "array", "output",
             "error", "open_mode", "job_name", "wrap", "nodes", "ntasks", "ntasks_per_node", "ntasks_per_gpu", "gpus",
             "gpus_per_task", "chdir"}
SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # fullmatch: '$' also matches before a final line break
_OWN_KEY = {"partition": "partition", "account": "account", "qos": "qos", "cpus_per_task": "cpus_per_task",
            "mem": "mem_gb", "gpus_per_node": "gpus_per_node", "gres": "gpus_per_node and gpu_type",
            "signal": "signal_delay_s"}
_TYPE_WORDS = {
    str: "a string",
    int: "an integer",
    (int, float): "a number",
    list: "a list of shell lines (strings)",
    dict: "a mapping of sbatch option -> value",
}


@dataclass(frozen=True)
class Profile:
    """One SLURM cluster's settings (slurm/profiles/*.yaml; keys documented in example_gpu.yaml)."""

    name: str
    path: Path | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = None
    gpu_type: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | None = None
    signal_delay_s: int | None = None
    setup: tuple[str, ...] = ()
    additional_parameters: dict[str, Any] = field(default_factory=dict)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


class _OnceLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it keeps the last: `partition: gpu` then
    `partition: cpu` submitted to cpu, in silence)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"key(s) {', '.join(twice)} given twice; give each "
                                                    f"once", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_profile(name_or_path: str | Path) -> Profile:
    """Reads slurm/profiles/NAME.yaml, or the YAML file at a path (anything with a / or .yaml)."""
    text = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml"))
    path = Path(text) if is_path else PROFILE_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no SLURM profile {text!r} ({path} does not exist). Available profiles in {PROFILE_DIR}: "
            f"{', '.join(available_profiles()) or '(none)'}; or pass the path of a YAML file."
        )
    try:
        data = yaml.load(path.read_text(), Loader=_OnceLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping of keys to values, got {type(data).__name__}")
    values = {key: _checked(path, key, value) for key, value in data.items()}
    values = {key: value for key, value in values.items() if value is not None}
    if "setup" in values:
        values["setup"] = tuple(values["setup"])
    return Profile(name=path.stem, path=path, **values)


def _checked(path: Path, key: Any, value: Any) -> Any:
    if key not in _KEY_TYPES:
        close = difflib.get_close_matches(str(key), _KEY_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{path}: unknown key {key!r}{hint}. Valid keys: {', '.join(_KEY_TYPES)} "
            "(documented at the top of slurm/profiles/example_gpu.yaml)."
        )
    expected = _KEY_TYPES[key]
    ok = value is None or (isinstance(value, expected) and not isinstance(value, bool))
    if key == "setup" and ok and value is not None:
        ok = all(isinstance(line, str) for line in value)
    if not ok:
        raise ConfigError(f"{path}: key {key!r} must be {_TYPE_WORDS[expected]}, got {value!r}")
    # written into the sbatch script as '#SBATCH --partition=...': a line break there began a shell line (run on
    # the node) and ended the #SBATCH block, so sbatch ignored every option after it (dependency, signal, time)
    if isinstance(value, str) and any(c in value for c in "\n\r\0"):
        raise ConfigError(f"{path}: key {key!r} must be one line, got {value!r}")
    # numbers in range: timeout_min 0 was ignored, a negative one reached sbatch, mem_gb .inf a traceback
    low = 0 if key == "gpus_per_node" else 1e-9
    if key in _NUMBERS and value is not None and not (math.isfinite(value) and value >= low):
        raise ConfigError(f"{path}: key {key!r} must be a finite number {'>= 0' if low == 0 else '> 0'}, got {value!r}")
    if key == "additional_parameters" and value:
        # written into the sbatch script as '#SBATCH --key=value': a key is a bare option name and a value one line
        bad = [f"{k!r}: {v!r}" for k, v in value.items()
               if not (isinstance(k, str) and SBATCH_OPTION.fullmatch(k)) or v is None or v is False
               or (isinstance(v, str) and any(c in v for c in "\n\r\0"))]
        if bad:
            raise ConfigError(f"{path}: additional_parameters entries {', '.join(bad)}: each must be an sbatch option "
                              "name (letters, digits, '-', '_') with a one-line value, or true for a bare flag "
                              "(leave an option out rather than set it null or false)")
        names = {str(k).replace("-", "_"): k for k in value}
        # sbatch reads an abbreviated long option as the option it begins (--arr as --array, --dep as --dependency)
        cut = sorted(f"{names[n]} (sbatch reads it as --{full[0].replace('_', '-')})" for n in names
                     if n not in _RESERVED and n not in _OWN_KEY
                     and (full := sorted(o for o in (*_RESERVED, *_OWN_KEY) if o.startswith(n))))
        if cut:
            raise ConfigError(f"{path}: additional_parameters {', '.join(cut)}: sbatch takes an abbreviated option "
                              "for the option it begins, and these begin ones the harness or a profile key sets; "
                              "spell each option out in full (the rules below then say which may be set)")
        reserved = sorted(names[n] for n in names if n in _RESERVED)
        if reserved:
            raise ConfigError(f"{path}: additional_parameters may not set {', '.join(reserved)}: the harness sets them "
                              "(requeue and cancelling a job whose dependency failed, "
                              "timeout_min's time limit, the dependencies between a grid's jobs, job names, arrays, "
                              "logs, and one task on one node: a grid job is one process)")
        own = sorted(f"{names[n]} (use {_OWN_KEY[n]})" for n in names if n in _OWN_KEY)
        if own:
            raise ConfigError(f"{path}: additional_parameters may not set {', '.join(own)}: the profile key of the "
                              "same meaning sets it, beside what each job asks for")
    return value


def make_executor(
    kind: str,
    folder: str | Path,
    profile: Profile | None,
    *,
    name: str,
    timeout_min: int,
    gpus: int = 0,
    cpus: int = 1,
    mem_gb: float = 4,
    array_parallelism: int | None = None,
    python: str | None = None,
) -> submitit.Executor:
    """A submitit executor for `kind` in KINDS, writing pickles and logs under `folder`.

    gpus/cpus/mem_gb/timeout_min are what the job needs; a profile raises cpus and mem_gb to
    its minimums, caps the time at the partition limit (the job then runs in requeued
    pieces) and refuses more GPUs than a node has. The profile is used by "slurm" only.

    array_parallelism: how many jobs run at once. slurm: tasks of one job array (sbatch
    --array=...%N; None = submitit's 256). local: submitit starts every job at once, so
    submissions block until fewer than N of this executor's jobs are running; None = as many
    as fit the machine's CPUs, or 1 for GPU jobs (local jobs all see the same first GPUs).
    debug: ignored (jobs run one by one, in this process, when their result is asked for).
    python: local only, the command that starts a task's interpreter (ablations.warm.python_prefix:
    tasks forked from a pre-imported server); None = this interpreter, started fresh.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown executor kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    folder = Path(folder)
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        cap = array_parallelism or (1 if gpus else max(1, (os.cpu_count() or 1) // cpus))
        executor = BoundedLocalExecutor(folder, max_running=cap, python=python)
        executor.update_parameters(
            timeout_min=timeout_min, gpus_per_node=gpus, signal_delay_s=_signal_delay_s(timeout_min)
        )
        return executor
    profile = profile or Profile(name="default")
    return _slurm_executor(folder, profile, name, timeout_min, gpus, cpus, mem_gb, array_parallelism)


def _slurm_executor(
    folder: Path,
    profile: Profile,
    name: str,
    timeout_min: int,
    gpus: int,
    cpus: int,
    mem_gb: float,
    array_parallelism: int | None,
) -> submitit.SlurmExecutor:
    if profile.gpus_per_node is not None and gpus > profile.gpus_per_node:
        where = profile.path or f"profile {profile.name!r}"
        raise ConfigError(
            f"job {name!r} asks for {gpus} GPUs but {where} has gpus_per_node={profile.gpus_per_node}; "
            "ask for fewer GPUs or use a profile of a GPU partition."
        )
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SchedulerError(
            "executor=slurm needs sbatch and srun on PATH: run on a SLURM login node, start the local "
            "test cluster (slurm/local_cluster.sh start; export SLURM_CONF=...), or use executor=local."
        )
    limit = min(timeout_min, profile.timeout_min or timeout_min)
    executor = submitit.SlurmExecutor(
        folder, max_num_timeout=math.ceil(timeout_min / limit) - 1 + SPARE_TIMEOUTS
    )
    params: dict[str, Any] = dict(
        job_name=name,
        time=limit,
        cpus_per_task=max(cpus, profile.cpus_per_task or 0),
        mem=f"{math.ceil(max(mem_gb, profile.mem_gb or 0) * 1024)}M",
        signal_delay_s=_signal_delay_s(limit, profile),
        partition=profile.partition,
        account=profile.account,
        qos=profile.qos,
        setup=list(profile.setup) or None,
        # requeue: submitit's `scontrol requeue` on the checkpoint signal fails where the cluster default is
        # JobRequeue=0; kill-on-invalid-dep: a job whose afterok dependency failed is cancelled (SLURM's default
        # keeps it PENDING for good), so the ledger sees it failed and retry=true submits it again
        additional_parameters={**profile.additional_parameters, "requeue": True, "kill_on_invalid_dep": "yes"},
    )
    if gpus:
        params["gres"] = f"gpu:{profile.gpu_type}:{gpus}" if profile.gpu_type else f"gpu:{gpus}"
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def check_limits(profile: Profile, timeouts: list[int]) -> None:
    """Every job's time limit against the profile's signal_delay_s, before the first sbatch: checked per submission,
    a short limit stopped the grid part way, with the jobs before it submitted."""
    for t in sorted(set(timeouts)):
        _signal_delay_s(min(t, profile.timeout_min or t), profile)


def _signal_delay_s(timeout_min: float, profile: Profile | None = None) -> int:
    if profile is not None and profile.signal_delay_s is not None:
        if profile.signal_delay_s * 2 > timeout_min * 60:
            raise ConfigError(f"{profile.path or profile.name}: signal_delay_s={profile.signal_delay_s} is more than "
                              f"half of a job's {timeout_min:g}-minute time limit (each piece of the job would spend "
                              "most of its time after the checkpoint signal); lower it, or raise that limit: the "
                              "profile's timeout_min, or train_timeout_min= for training and stage-2 jobs")
        return profile.signal_delay_s
    # A delay longer than the job makes SLURM signal it at once: use a quarter of short jobs.
    return min(SIGNAL_DELAY_S, int(timeout_min * 60) // 4)


class BoundedLocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, running at most `max_running` of its jobs at once.

    LocalExecutor starts a process per job immediately (an array of 50 is 50 processes).
    Here each submission first waits until fewer than `max_running` jobs started by this
    executor are alive, so submit/map_array block while the cap is reached.
    """

    def __init__(self, folder: str | Path, max_running: int, python: str | None = None) -> None:
        super().__init__(folder, python=python)
        self.max_running = max_running
        self._running: list[subprocess.Popen] = []
        self.controller_log = Path(folder) / "controllers.log"

    def _submit_command(self, command: str) -> submitit.LocalJob:
        while True:
            self._running = [p for p in self._running if p.poll() is None]
            if len(self._running) < self.max_running:
                break
            time.sleep(0.2)
        # submitit's job controller inherits our stdout/stderr (its jobs write their own logs), and on Ctrl-C
        # prints its KeyboardInterrupt traceback there, under the launcher's "interrupted" line: give it a file.
        self.controller_log.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        try:
            with io.open_append(self.controller_log, "ab") as f:
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
            job = super()._submit_command(command)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        self._running.append(job._process)
        return job


class ResumableJob(Checkpointable):
    """Runs `fn(**kwargs)`, and asks submitit to run the same call again when interrupted.

    `fn` must resume from its own checkpoint on disk: a requeued job calls it again with the
    same arguments and nothing else is carried over. `fn` must be importable (module level).

    What submitit does on SLURM: jobs are submitted with --signal=USR2@<delay>. SLURM sends
    SIGUSR2 that long before the time limit; `scancel --signal=USR2` (submitit's
    `job._interrupt()`) sends it by hand; clusters with PreemptParameters=send_user_signal
    send it on preemption. submitit's handler then calls `checkpoint()`, pickles the
    DelayedSubmission it returns over the job's submitted pickle, runs
    `scontrol requeue <job id>` and exits. The job keeps its id and waits pending (SLURM holds
    a requeued job back for AuthInfo cred_expire, 120 s by default) before running again.
    - Timeout vs preemption is told apart only by elapsed time (>= 80% of the limit, or
      limit - 10 min if smaller, is a timeout: with a limit of 10 min or less, every signal
      is). Timeouts count down submitit's max_num_timeout (then the job fails with
      UncompletedJobError); preemptions do not.
    - SIGTERM is only logged ("Bypassing signal SIGTERM"). A cluster that preempts with
      SIGTERM then SIGKILL kills the job without this requeue; with PreemptMode=REQUEUE SLURM
      reruns the same pickled call itself, and `fn` again resumes from its checkpoint.
    - Handlers `fn` installs replace submitit's. For SIGUSR2 it must call the handler it
      replaced (signal.getsignal) after saving, or nothing is requeued; for SIGTERM it must
      return, not exit (job._interrupt(), like some clusters, sends SIGTERM just before).
    The local executor does the same with exit code 144, restarting the job in place.
    """

    def __init__(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self) -> Any:
        return self.fn(**self.kwargs)

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(self)
