"""Locks that keep two launchers, or two copies of one job, off the same outputs.

flock(2) on a lock file: the kernel drops the lock when its holder ends, however it ends (kill -9,
a finished or cancelled SLURM job, a node whose NFS lease expires), so a stale lock is taken over
without a liveness check of our own. The file names who took it last (pid, host, start time,
SLURM job id), so a refused process can say who holds it; a clean release empties it, so a
holder that died is named when its lock is taken over. The fd is close-on-exec: a job's child
processes do not keep its lock. A filesystem without flock (Lustre mounted without -o flock)
gives no protection: a warning, not an error.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from siren.errors import ConfigError, SirenError
from siren.io import open_no_link

log = logging.getLogger(__name__)


class LockHeld(SirenError, RuntimeError):
    """Another process holds the lock; the message names it and what to do."""


def describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (it has not written its details yet)"
    slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"{holder.get('what', 'a process')} (pid {holder['pid']} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')}{slurm})")


PROBE_GRACE_S = 2.0  # how long a lock without a holder's details is waited for before it counts as held


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:  # a holder caught between truncate and write
        return {}


@contextmanager
def hold(path: str | os.PathLike, what: str, fix: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock at ``path`` for the ``with`` body; raise LockHeld naming the holder (and ``fix``) if taken,
    or with ``wait``, wait for it (saying once who holds it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, no permission: the folder is the user's to change, not a traceback
        raise ConfigError(f"{path.parent}: cannot make this folder ({e.strerror}); give one you can write to") from None
    fd = open_no_link(path, os.O_RDWR)  # it truncates the file: never one a link names
    try:
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # held by `holder`'s brief shared lock (action=status asking: the details then are a dead holder's,
                # if any), or by a holder, who has written its details or is about to: refused after the grace
                if time.monotonic() > deadline:
                    if not wait:
                        raise LockHeld(f"{path}: held by {describe(_read(fd))}; {fix}") from None
                    log.info("%s: waiting for %s", path, describe(_read(fd)))
                    deadline = float("inf")
                time.sleep(0.05)
                continue
            except OSError as e:  # ENOLCK / ENOSYS / EOPNOTSUPP: this filesystem has no flock
                log.warning("%s: cannot lock (%s); nothing stops a second launcher here", path, e.strerror)
            break
        prev = _read(fd)
        if prev.get("pid"):
            log.warning("%s: taking over the lock of %s, which ended without releasing it", path, describe(prev))
        me = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def holder(path: str | os.PathLike) -> dict | None:
    """Who holds the lock at ``path`` now (their details), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        except OSError:  # no flock here: nothing can be told
            return None
        return None  # closing the fd drops the shared lock just taken
    finally:
        os.close(fd)
