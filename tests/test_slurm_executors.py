"""ablations/executors.py against real executors: profiles, a local SLURM, requeue, local/debug."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ablations.executors import KINDS, ResumableJob, load_profile, make_executor
from siren.errors import ConfigError
from tests.helpers import wait_for
from tests.slurm_cluster import count_steps, logged_square, preempt, slurm_cluster, square  # noqa: F401

# ---- profiles and arguments (no cluster needed) ----


def test_load_profile_by_name_and_path():
    local = load_profile("local")
    assert (local.name, local.partition, local.gpus_per_node) == ("local", "debug", 0)
    gpu = load_profile(local.path.parent / "example_gpu.yaml")
    assert gpu.setup == ("module load cuda/12.4", 'source "$HOME/siren/.venv/bin/activate"')
    assert gpu.additional_parameters == {"constraint": "a100_80g", "mail-type": "FAIL"}


def test_unknown_profile_key_names_file_key_and_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("partiton: gpu\n")
    with pytest.raises(ValueError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and "'partiton'" in message and "did you mean 'partition'" in message
    for key in ("partition", "account", "qos", "gpus_per_node", "setup", "additional_parameters"):
        assert key in message


def test_profile_value_of_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("setup: module load cuda\n")
    with pytest.raises(ValueError, match=r"bad.yaml: key 'setup' must be a list of shell lines"):
        load_profile(path)


@pytest.mark.parametrize("text, words", [
    ("timeout_min: 0\n", "'timeout_min' must be a finite number > 0"),  # was ignored
    ("timeout_min: -150\n", "'timeout_min' must be a finite number > 0"),  # reached sbatch
    ("mem_gb: .inf\n", "'mem_gb' must be a finite number > 0"),  # an OverflowError traceback
    ("gpus_per_node: -1\n", "'gpus_per_node' must be a finite number >= 0"),
    ("additional_parameters:\n  signal: USR1@60\n", "may not set signal \\(use signal_delay_s\\)"),  # USR2 checkpoints
    ("signal_delay_s: 0\n", "'signal_delay_s' must be a finite number > 0"),
    # each replaced the harness's own line in the sbatch script without a word: the afterok chain (training
    # before prepare finished), the job's log files, what the job asked for
    ("additional_parameters:\n  dependency: singleton\n", "may not set dependency: the harness sets them"),
    ("additional_parameters:\n  output: /tmp/x.out\n", "may not set output"),
    ("additional_parameters:\n  cpus-per-task: 1\n", "may not set cpus-per-task \\(use cpus_per_task\\)"),
    ("additional_parameters:\n  mem: 1G\n", "may not set mem \\(use mem_gb\\)"),
    # a grid job is one process: more tasks deadlocked on the job's lock, another folder lost its outputs
    ("additional_parameters:\n  ntasks-per-node: 8\n", "may not set ntasks-per-node"),
    ("additional_parameters:\n  chdir: /scratch\n", "may not set chdir"),
    # sbatch reads an abbreviation as the option it begins: --arr on a job that is not an array, --dep on one
    # without a dependency took effect
    ("additional_parameters:\n  arr: 0-7\n", "arr \\(sbatch reads it as --array\\)"),
    ("additional_parameters:\n  dep: afterany:1\n  outp: /tmp/x\n",
     "dep \\(sbatch reads it as --dependency\\), outp \\(sbatch reads it as --output\\): .*spell each option out"),
    ("additional_parameters:\n  part: gpu\n", "part \\(sbatch reads it as --partition\\)"),
    # written into the sbatch script: a line break became a shell line, null/false reached sbatch as None/False
    ("additional_parameters:\n  constraint: \"a100\\necho injected\"\n", "each must be an sbatch option name"),
    ("additional_parameters:\n  \"key\\necho x\": 1\n", "each must be an sbatch option name"),
    # a final line break passed '^...$': '#SBATCH --comment' then '=x' ended the #SBATCH block, and sbatch ignored
    # the options after it (the afterok dependency, the checkpoint signal, the time limit)
    ("additional_parameters:\n  \"comment\\n\": x\n", "each must be an sbatch option name"),
    # a line break in a plain key's value became a shell line of the batch script, run on the node
    ("partition: \"gpu\\ntouch /tmp/pwned #\"\n", "key 'partition' must be one line"),
    ("gpu_type: \"a100\\r\"\n", "key 'gpu_type' must be one line"),
    ("additional_parameters:\n  exclusive: false\n", "leave an option out rather than set it null or false"),
])
def test_profile_numbers_and_reserved_options_are_checked(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        load_profile(path)
    (tmp_path / "ok.yaml").write_text("gpus_per_node: 0\nadditional_parameters:\n  constraint: a100\n")
    load_profile(tmp_path / "ok.yaml")


def test_missing_profile_lists_available_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("no_such_cluster")
    assert "'no_such_cluster'" in str(err.value) and "example_gpu, local" in str(err.value)


def test_unknown_executor_kind_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown executor kind 'slrum'; valid kinds: slurm, local, debug"):
        make_executor("slrum", tmp_path, None, name="x", timeout_min=1)
    assert KINDS == ("slurm", "local", "debug")


def test_more_gpus_than_the_profile_has_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"asks for 1 GPUs but .*local.yaml has gpus_per_node=0"):
        make_executor("slurm", tmp_path, load_profile("local"), name="x", timeout_min=1, gpus=1)


# ---- debug and local executors ----


def test_debug_executor_runs_the_function(tmp_path):
    ex = make_executor("debug", tmp_path, None, name="sq", timeout_min=1)
    assert ex.submit(square, 7).result() == 49


def test_local_executor_runs_an_array_with_bounded_concurrency(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ex = make_executor("local", tmp_path / "jobs", None, name="sq", timeout_min=2, array_parallelism=1)
    jobs = ex.map_array(functools.partial(logged_square, log_dir=str(logs), sleep_s=0.3), [1, 2, 3])
    assert [job.result() for job in jobs] == [1, 4, 9]
    spans = sorted(tuple(map(float, (logs / f"{x}.txt").read_text().split())) for x in (1, 2, 3))
    # With a cap of 1, each job starts after the previous one ended.
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:]))


def test_a_cancelled_local_jobs_controller_writes_its_traceback_to_a_log(tmp_path, capfd):
    """Ctrl-C in a grid cancels its running local jobs (SIGINT to submitit's controller, which a terminal's
    Ctrl-C also reaches); the controller's KeyboardInterrupt traceback goes to logs/controllers.log, not to the
    stderr it would inherit, under the launcher's one "interrupted" line."""
    ex = make_executor("local", tmp_path / "jobs", None, name="sq", timeout_min=2)
    # A suite started in the background (`cmd &` in a script) has SIGINT ignored, and a child inherits that, so
    # the controller could not be cancelled at all; start it as from a terminal (a handler resets at exec).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = ex.submit(logged_square, 3, log_dir=str(tmp_path), sleep_s=60)
    finally:
        signal.signal(signal.SIGINT, before)
    wait_for(lambda: job.paths.stdout.exists(), "the job's task to start")
    job.cancel()
    wait_for(lambda: job._process.poll() is not None, "the controller to stop")
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    assert "KeyboardInterrupt" in (tmp_path / "jobs" / "controllers.log").read_text()


# ---- a real SLURM ----


def _sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()



def _slurm(tmp_path: Path, cluster, **kwargs):
    kwargs = {"name": "test", "timeout_min": 10, "mem_gb": 1, **kwargs}
    return make_executor("slurm", tmp_path / "jobs", load_profile(cluster.profile), **kwargs)


def test_slurm_job_returns_its_result_and_sacct_sees_it(slurm_cluster, tmp_path):
    job = _slurm(tmp_path, slurm_cluster).submit(square, 12)
    assert job.result() == 144
    wait_for(lambda: _sacct_states(job.job_id) == ["COMPLETED"], f"sacct to show job {job.job_id} COMPLETED")


def test_slurm_job_array(slurm_cluster, tmp_path):
    jobs = _slurm(tmp_path, slurm_cluster, array_parallelism=2).map_array(square, [1, 2, 3])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one sbatch --array
    assert [job.result() for job in jobs] == [1, 4, 9]
    array_id = jobs[0].job_id.split("_")[0]
    wait_for(lambda: _sacct_states(array_id) == ["COMPLETED"] * 3, f"sacct to show array {array_id} done")


def test_profile_maps_to_sbatch_flags(slurm_cluster, tmp_path):
    gpu = load_profile("example_gpu")
    ex = make_executor("slurm", tmp_path, gpu, name="train", timeout_min=3000, gpus=1, cpus=2, mem_gb=8)
    script = ex._make_submission_file_text("python -m job", "uid")
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my_lab",
        "#SBATCH --qos=normal",
        "#SBATCH --gres=gpu:a100:1",
        "#SBATCH --cpus-per-task=10",  # raised to the profile's minimum
        "#SBATCH --mem=65536M",
        "#SBATCH --time=1440",  # capped at the partition limit ...
        "#SBATCH --signal=USR2@120",
        "#SBATCH --constraint=a100_80g",
        "#SBATCH --mail-type=FAIL",
        # always: submitit's requeue needs it where JobRequeue=0, and a job whose dependency failed is cancelled
        # (SLURM's default keeps it PENDING for good, where retry=true never resubmitted it)
        "#SBATCH --requeue",
        "#SBATCH --kill-on-invalid-dep=yes",
        "module load cuda/12.4",
    ]:
        assert line in script.splitlines(), line
    assert ex.max_num_timeout == 2 + 3  # ... so the 3000-minute job runs in 3 pieces: 2 more timeouts


def test_a_profile_sets_the_checkpoint_signals_margin(slurm_cluster, tmp_path):
    """120 s may be short for a 3.3B model's checkpoint on a slow filesystem: signal_delay_s sets the margin, up
    to half the time limit (a job's piece would otherwise spend most of its time after the signal)."""
    path = tmp_path / "slow_fs.yaml"
    path.write_text("timeout_min: 60\nsignal_delay_s: 900\n")
    ex = make_executor("slurm", tmp_path, load_profile(path), name="train", timeout_min=3000)
    assert "#SBATCH --signal=USR2@900" in ex._make_submission_file_text("python -m job", "uid").splitlines()
    path.write_text("timeout_min: 20\nsignal_delay_s: 900\n")
    with pytest.raises(ValueError, match=r"slow_fs.yaml: signal_delay_s=900 is more than half of a job's 20-minute"):
        make_executor("slurm", tmp_path, load_profile(path), name="train", timeout_min=3000)
    # a grid checks every job's limit before its first sbatch: checked per submission, the jobs before the first
    # short one were submitted when the grid stopped, and the fix named only the profile's timeout_min
    from ablations import pipeline
    from ablations.ledger import Job

    path.write_text("signal_delay_s: 1000\n")
    jobs = [Job("data", print, {}, tmp_path / "data.done", timeout_min=24 * 60),
            Job("train", print, {}, tmp_path / "train.done", deps=["data"], timeout_min=30)]
    with pytest.raises(ValueError, match=r"30-minute time limit .*train_timeout_min= for training"):
        pipeline.submit_slurm(jobs, tmp_path / "grid", load_profile(path), retry=False)
    assert not (tmp_path / "grid" / "jobs").exists()


def test_a_grid_job_runs_in_its_launchers_folder_wherever_the_setup_lines_go(slurm_cluster, tmp_path, monkeypatch):
    """A grid's paths (outputs/..., its done markers) are relative to the folder the launcher ran in: a profile
    whose setup lines cd'd to a scratch folder had every job write there, and the launcher never saw it done."""
    from ablations import pipeline
    from ablations.ledger import Job

    launch, scratch = tmp_path / "launch", tmp_path / "scratch"
    launch.mkdir(), scratch.mkdir()
    monkeypatch.chdir(launch)
    profile = dataclasses.replace(load_profile(slurm_cluster.profile), setup=(f"cd {scratch}",))
    ex = make_executor("slurm", tmp_path / "jobs", profile, name="cell", timeout_min=10, mem_gb=1)
    job = ex.submit(pipeline._callable(Job("cell", square, {"x": 3}, Path("cell.done"))))
    assert job.result() == 9
    assert (launch / "cell.done").is_file() and not (scratch / "cell.done").exists()


@pytest.mark.parametrize("save_every_step", [True, False], ids=["saves-every-step", "saves-on-SIGUSR2"])
def test_interrupted_resumable_job_is_requeued_and_resumes(slurm_cluster, tmp_path, save_every_step):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    total = 20
    # timeout_min=30: submitit calls a signal before 20 min a preemption (under 10 min, any
    # signal counts as a timeout and uses up one of max_num_timeout).
    ex = _slurm(tmp_path, slurm_cluster, timeout_min=30)
    fn = functools.partial(count_steps, save_every_step=save_every_step)
    job = ex.submit(ResumableJob(fn, ckpt_dir=str(ckpt), total=total, sleep_s=0.2))
    progress = ckpt / "progress.txt"
    wait_for(lambda: progress.exists() and int(progress.read_text()) >= 3, "the job to reach step 3")
    preempt(job)  # what SLURM does on preemption: SIGTERM, then the USR2 submitit acts on
    assert job.result() == total
    starts = [int(line) for line in (ckpt / "starts.txt").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0, starts
    assert 3 <= starts[1] < total, starts  # resumed from its checkpoint, not from 0
    assert "this job is preempted" in job.paths.stderr.read_text()
    wait_for(lambda: _sacct_states(job.job_id) == ["COMPLETED"], f"sacct to show job {job.job_id} COMPLETED")


def test_local_cluster_script_refuses_a_state_folder_not_its_own(tmp_path):
    """slurm/local_cluster.sh runs as root and kills the pids its state folder lists: a folder put in its place (a
    link here; another user's folder alike) is refused before anything is read, written or started."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "theirs")
    script = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"
    for command in ("status", "start"):
        done = subprocess.run(["bash", str(script), command], capture_output=True, text=True,
                              env={**os.environ, "SIREN_SLURM_DIR": str(tmp_path / "state")})
        assert done.returncode == 2 and "is not a folder of this user's" in done.stderr, done.stderr
    assert list((tmp_path / "theirs").iterdir()) == []
