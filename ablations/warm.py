"""Warm starts for local jobs: one server process imports torch and the harness once, and every
job's task is forked from it instead of starting a fresh interpreter.

Why: a demo grid is ~30 short jobs, and each fresh task paid its imports again: ~6 s for a training
job (torch, and torch._dynamo, which the optimizer imports), ~13 s for an evaluation (laion_clap,
transformers, sklearn). On a 2-core machine that was a fifth of the demo Table 6 (README: Measured).

submitit stays in charge: its LocalExecutor and its controller run as always; only the task's
command, ``python -u -m submitit.core._submit FOLDER``, becomes
``python -m ablations.warm ADDRESS -u -m submitit.core._submit FOLDER``. That client (standard
library only) hands its stdin/stdout/stderr, environment and working directory to the server, which
forks a child that runs the same module as ``__main__``. The client relays the signals the
controller sends (SIGUSR2 before the time limit, SIGTERM, SIGINT) to the child and exits with the
child's status, so timeouts, requeues (exit 144) and failures look the same to submitit. A client
killed outright (the controller's SIGKILL) closes its connection, and the server then kills the child.
A client that cannot reach the server runs the command itself, cold.

The server listens on a Linux abstract socket (nothing is written to disk), serves only its own
user (SO_PEERCRED) and only ``submitit.core._submit``, and exits when its launcher is gone and no
child is left. Its torch ops run on one thread (no thread pool for the children to inherit); each
child gets fresh ``random``/``numpy``/``torch`` seeds as a new process would, and leaves through the
job's own exit handlers.
"""
from __future__ import annotations

import atexit
import importlib
import io
import json
import logging
import os
import secrets
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ENTRY = "submitit.core._submit"  # the only module a child runs
# What every demo job imports ("module:function" is also called: laion_clap's import goes through the
# harness's own); one that fails to import here is imported, and its error reported, by the job itself.
PRELOAD = ("torch", "torch._dynamo", "submitit.core.submission", "ablations.steps", "siren.train",
           "siren.data.prepare", "siren.rl.alignment", "eval.audiocaps", "eval.backbones", "eval.generate",
           "siren.clap:_clap_module")
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_CRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def _preload(names: list[str]) -> list[str]:
    failed = []
    for name in names:
        module, _, function = name.partition(":")
        try:
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
        except Exception as e:  # noqa: BLE001 - the job imports it again and reports its own error
            failed.append(f"{name} ({type(e).__name__}: {e})")
    return failed


def demo_networks() -> None:
    """Preload entry of runs with demo weights: the codec and the metric networks, built once here and kept
    (siren.demo_weights.keep_loaded), so a job gets a copy instead of rebuilding them. torch runs on
    one thread meanwhile, so the server starts no thread pool for its children to inherit; its default
    count is set back after (a setting only: threads start at the next parallel op, in a child)."""
    import torch

    from eval.backbones import ClapAudio, PannsCnn14, VGGish
    from siren import demo_weights
    from siren.codec import CodecConfig
    from siren.frontends import build_codec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo_weights.keep_loaded()
        build_codec(CodecConfig(weights="demo"))
        for backbone in (PannsCnn14, VGGish, ClapAudio):
            backbone("demo").net
    finally:
        torch.set_num_threads(threads)


def cuda_visible() -> bool:
    """Whether torch sees a CUDA device here. Then no server runs (``server``): a process forked after its
    parent initialised CUDA cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess"), and the
    server's preload does. Asked in the launcher, which starts the server and the
    cold jobs with fork + exec, never a bare fork."""
    import torch

    return torch.cuda.is_available()


def _read_line(conn: socket.socket, first: bytes = b"") -> bytes:
    data = first
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        data += chunk
    return data


def _child(conn: socket.socket, fds: list[int], request: dict, others: list[socket.socket]) -> None:
    """In the forked child: become the task (stdio, cwd, environment, argv), run it, exit."""
    code = 1
    try:
        for s in others:
            s.close()
        for sig in (*RELAYED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdout.flush(), sys.stderr.flush()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        conn.close()
        # unbuffered text streams, as `python -u` (handlers made at import keep the old objects: same fds)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        # The root logger as a fresh process has it, with no handler: a library that logs on the root logger
        # while the server preloads (laion_clap's create_model: logging.info) gives it basicConfig's handler,
        # and the job's own (siren.cli) would then print every line twice.
        logging.getLogger().handlers.clear()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        import numpy as np

        random.seed()  # a fresh process's unseeded streams differ from run to run: so do the children's
        np.random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        sys.argv = [ENTRY, *request["args"]]
        import runpy

        try:
            runpy.run_module(ENTRY, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT  # what a shell reports for an interpreter stopped by Ctrl-C
        except BaseException:  # noqa: BLE001 - printed as the interpreter would, then the exit status
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve(address: str, preload: list[str], deferred: list[str] = ()) -> None:
    """The server: preload, then fork a child per request until the launcher is gone and no child is left.
    ``deferred`` entries are loaded once serving, one between two looks at the queue: the first job (a grid's
    data preparation, which needs none of them) starts without waiting for them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address)
    listener.listen(64)  # clients that connect during the preload wait here
    launcher = os.getppid()
    stopping = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the jobs themselves; the server outlives them
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    failed, deferred = _preload(preload), list(deferred)
    children: dict[int, socket.socket] = {}  # pid -> its client's connection
    while True:
        if failed:
            print(f"warm start: not preloaded (the jobs load them): {'; '.join(failed)}", file=sys.stderr, flush=True)
            failed = []
        while children:  # reap: tell each finished child's client its status
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
        if (stopping or os.getppid() != launcher) and not children:
            return
        ready, _, _ = select.select([listener, *children.values()], [], [], 0 if deferred else 0.2)
        for s in ready:
            if s is listener:
                if not stopping:
                    _accept(listener, children)
                continue
            if not s.recv(1):  # the client is gone (SIGKILL): its child must not run on unwatched
                pid = next(p for p, c in children.items() if c is s)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if deferred and not ready:
            failed = _preload([deferred.pop(0)])


def _accept(listener: socket.socket, children: dict[int, socket.socket]) -> None:
    conn, _ = listener.accept()
    _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    try:
        if uid != os.getuid():
            raise PermissionError(f"connection from uid {uid}")
        first, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        request = json.loads(_read_line(conn, first))
        if request.get("module") != ENTRY or len(fds) != 3:
            raise ValueError(f"refused request for module {request.get('module')!r} with {len(fds)} fds")
    except (OSError, ValueError) as e:
        print(f"warm start: {e}", file=sys.stderr, flush=True)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        _child(conn, fds, request, [listener, *children.values()])
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    conn.sendall(f"{pid}\n".encode())


def client(address: str, argv: list[str]) -> int:
    """The task command: run ``python ARGV`` (``-u -m submitit.core._submit FOLDER``) as a child of the server."""
    if argv[:3] != ["-u", "-m", ENTRY]:
        raise SystemExit(f"ablations.warm runs only `-u -m {ENTRY} ...`, got {argv}")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect("\0" + address)
        # The address is in every job's command line: a listener of another user (one that bound the name
        # first, or after the server died) would get this job's environment and stdio. Only our own server.
        _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid != os.getuid():
            raise PermissionError(f"warm start: {address} is served by uid {uid}, not this user; running cold")
    except OSError as e:  # no server (it exited, or this platform has no abstract sockets), or not ours: cold
        if isinstance(e, PermissionError):
            print(e, file=sys.stderr, flush=True)
        conn.close()
        os.execv(sys.executable, [sys.executable, *argv])
    request = {"module": ENTRY, "args": argv[3:], "env": dict(os.environ), "cwd": os.getcwd()}
    replies = conn.makefile("rb")  # the pid line and the status line may arrive in one read
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        pid = int(replies.readline())
    except (OSError, ValueError):  # the server refused or died before forking: nothing ran, run it cold
        conn.close()
        os.execv(sys.executable, [sys.executable, *argv])
    def relay(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # it has just finished: its status is on its way
            pass

    for sig in RELAYED:
        signal.signal(sig, relay)
    try:
        code = int(replies.readline())
    except (OSError, ValueError):  # an empty line: the connection closed
        return 1  # the server went away before the child finished
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


@contextmanager
def server(log: Path, preload: tuple[str, ...] = PRELOAD, deferred: tuple[str, ...] = ()) -> Iterator[str | None]:
    """A warm-start server for the duration of a local run; yields its address, or None where it cannot
    run (not Linux: no abstract sockets; a CUDA device visible: ``cuda_visible``). Its messages go to ``log``.
    ``deferred``: see ``serve``."""
    if not sys.platform.startswith("linux"):
        yield None
        return
    if cuda_visible():
        logging.getLogger(__name__).info("warm starts off: a CUDA device is visible, and a job forked from the "
                                         "server could not use it (the jobs start cold)")
        yield None
        return
    address = f"siren-warm-{os.getpid()}-{secrets.token_hex(6)}"
    log.parent.mkdir(parents=True, exist_ok=True)
    from siren.io import open_append  # here, in the launcher: the client imports the standard library only

    with open_append(log) as err:
        proc = subprocess.Popen([sys.executable, "-m", "ablations.warm", "serve", address, *preload, "--", *deferred],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        yield address
    finally:
        proc.terminate()  # it stops accepting and exits once its children are done


def python_prefix(address: str | None) -> str | None:
    """The LocalExecutor ``python`` that starts tasks through the server at ``address`` (None: plain python)."""
    return None if address is None else f"{shlex.quote(sys.executable)} -m ablations.warm {address}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        names = sys.argv[3:]
        serve(sys.argv[2], names[:names.index("--")], names[names.index("--") + 1:])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
