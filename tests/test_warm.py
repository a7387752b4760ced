"""Warm starts of local jobs (ablations/warm.py): submitit's local executor and controller, with each
task forked from a server that imported its modules once. Each test drives real submitit jobs."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ablations import warm
from ablations.executors import make_executor
from tests.helpers import startup_env, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="warm starts need Linux")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # the process has just ended
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"



def describe(value):
    """A job: where it ran, and what a fresh process would show."""
    import torch

    print("job stdout", flush=True)
    return {"value": value, "parent": _cmdline(os.getppid()), "cwd": os.getcwd(),
            "executor": os.environ.get("SUBMITIT_EXECUTOR"), "torch_rand": torch.rand(3).tolist()}


def wait_for_signal(marker: str):
    """A job that records its pid, then waits for SIGUSR2 (relayed by the client) and returns."""
    got = []
    signal.signal(signal.SIGUSR2, lambda *_: got.append(True))
    Path(marker).write_text(str(os.getpid()))
    while not got:
        time.sleep(0.05)
    return "got SIGUSR2"


def fail():
    raise ValueError("the job's own error")


def log_on_root():
    """What laion_clap's create_model does while the server preloads the demo networks."""
    logging.info("a library's line on the root logger")


def log_a_warning():
    logging.getLogger("eval.audiocaps").warning("a line the job logs once")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with warm.server(tmp_path_factory.mktemp("warm") / "warm.log", preload=("torch",), deferred=("numpy",)) as address:
        yield address


def _executor(tmp_path, address):
    return make_executor("local", tmp_path / "logs", None, name="t", timeout_min=5,
                         python=warm.python_prefix(address))


def _client_of(address: str) -> int:
    """The task process (the client) whose controller started it: the process running ``ablations.warm ADDRESS``."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    clients = [p for p in pids if f"ablations.warm {address} -u" in _cmdline(p)]
    assert len(clients) == 1, clients
    return clients[0]


def test_a_job_runs_forked_from_the_server_like_a_fresh_process(server, tmp_path):
    ex = _executor(tmp_path, server)
    first, second = ex.submit(describe, 21), ex.submit(describe, 4)
    a, b = first.result(), second.result()
    assert (a["value"], b["value"]) == (21, 4)
    assert f"ablations.warm serve {server}" in a["parent"]  # forked by the server, not a new interpreter
    assert a["cwd"] == os.getcwd() and a["executor"] == "local"  # the controller's directory and environment
    assert "job stdout" in Path(first.paths.stdout).read_text()  # stdio is the job's own log
    cold = make_executor("local", tmp_path / "cold", None, name="t", timeout_min=5).submit(describe, 0).result()
    assert "submitit.local._local" in cold["parent"]
    assert a["torch_rand"] != b["torch_rand"]  # unseeded streams differ between jobs, as between fresh processes


def test_a_server_started_under_the_job_settings_gives_them_to_its_jobs(tmp_path):
    """glibc and libgomp read them at process start: a forked job has the server's, so the server must start
    with them."""
    from ablations import pipeline

    with pipeline._job_env(), warm.server(tmp_path / "warm.log", preload=("json",)) as address:
        job = _executor(tmp_path, address).submit(startup_env)
        env = job.result()
    assert env == {k: os.environ.get(k, v) for k, v in pipeline.JOB_ENV.items()}


def test_a_job_logs_each_line_once_in_the_one_format(tmp_path):
    """A server whose preload logged on the root logger (basicConfig's handler) must not hand that handler to
    its jobs: with the job's own (run_marked sets up siren.cli's), every line was printed twice."""
    from ablations import pipeline

    with warm.server(tmp_path / "warm.log", preload=("torch", "tests.test_warm:log_on_root")) as address:
        job = _executor(tmp_path, address).submit(pipeline.run_marked, step=log_a_warning,
                                                  done=str(tmp_path / "done.json"), kwargs={}, threads=1,
                                                  cwd=os.getcwd())
        job.result()
    err = Path(job.paths.stderr).read_text()
    assert err.count("a line the job logs once") == 1, err
    assert " W eval.audiocaps: a line the job logs once" in err  # siren.cli's format, not basicConfig's


def test_the_client_relays_signals_to_the_job(server, tmp_path):
    marker = tmp_path / "pid"
    job = _executor(tmp_path, server).submit(wait_for_signal, str(marker))
    wait_for(marker.exists, "the job to start")
    client = _client_of(server)
    os.kill(client, signal.SIGUSR2)  # what the controller sends before the time limit
    assert job.result() == "got SIGUSR2"


def test_a_killed_client_takes_its_job_with_it(server, tmp_path):
    marker = tmp_path / "pid"
    _executor(tmp_path, server).submit(wait_for_signal, str(marker))
    wait_for(marker.exists, "the job to start")
    child = int(marker.read_text())
    os.kill(_client_of(server), signal.SIGKILL)  # the controller's last resort
    wait_for(lambda: not _alive(child), "the server to kill the orphaned job", deadline_s=10)


def test_the_job_error_and_a_missing_server(server, tmp_path):
    with pytest.raises(Exception, match="the job's own error"):
        _executor(tmp_path, server).submit(fail).result()
    cold = _executor(tmp_path / "gone", "siren-warm-no-such-server").submit(describe, 3).result()
    assert cold["value"] == 3 and "submitit.local._local" in cold["parent"]  # ran cold, not failed


def test_the_client_refuses_other_commands():
    with pytest.raises(SystemExit, match="runs only"):
        warm.client("x", ["-c", "print(1)"])


def _client_proc(address: str, tmp_path: Path, **env):
    import subprocess

    return subprocess.run([sys.executable, "-m", "ablations.warm", address, "-u", "-m", warm.ENTRY,
                           str(tmp_path / "no-job")], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.getuid() != 0, reason="listening as another user needs root")
def test_the_client_talks_only_to_a_server_of_its_own_user(tmp_path):
    """The address is in every job's command line: another user's listener on it got the job's environment
    (secrets included) and stdio, and its replies were taken as the job's pid and status. Now the client checks
    the listener's uid and runs the job cold."""
    import subprocess

    address = f"siren-warm-test-{os.getpid()}"
    impostor = subprocess.Popen([sys.executable, "-c", f"""
import os, socket
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0{address}"); s.listen()
print("ready", flush=True)
c, _ = s.accept()
print("received", len(c.recv(1 << 16)), flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline().strip() == "ready"
        job = _client_proc(address, tmp_path, SECRET_TOKEN="hunter2")
        assert impostor.communicate(timeout=30)[0].strip() == "received 0"
    finally:
        impostor.kill()
    assert f"{address} is served by uid 65534, not this user; running cold" in job.stderr
    assert "Known environments" in job.stderr  # submitit's own error (no job environment here): it ran cold


def test_the_client_reads_the_pid_and_the_status_arriving_together(tmp_path):
    """A server whose two lines (the child's pid, then its status) came in one read: int("123\\n0\\n") failed and
    the finished job was run a second time, cold."""
    import socket
    import threading

    address = f"siren-warm-test2-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address)
    listener.listen()

    def serve_once():
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{os.getpid()}\n0\n".encode())
        conn.close()

    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    try:
        job = _client_proc(address, tmp_path)
    finally:
        listener.close()
    assert job.returncode == 0, job.stderr
