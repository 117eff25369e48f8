"""One run per workdir: `with lock_workdir(workdir): ...` holds WORKDIR/.lock for the life of a run, so a second
`llmjax train` / `llmjax finetune` on the same workdir is refused (ConfigError naming the holder's host and pid)
before it prepares data or writes anything.

The lock is fcntl.flock on a file descriptor kept open for the whole run: the kernel releases it when the
process ends, however it ends (SIGKILL, OOM, a crash), so a lock file left behind never blocks a later run; its
stale content (the dead holder's host and pid) is simply overwritten by the next holder. The lock is advisory
(only llmjax looks at it). On NFS, flock is only as good as the server's lock support: with locking (NFSv4, or
NFSv3 with lockd) it holds across hosts; without it (e.g. mounted `nolock`) it is per host only, and two hosts
can still run on one workdir. A multi-process run holds one lock, taken by process 0 (the others share its run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from llmjax import storage
from llmjax.models.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive, non-blocking flock on WORKDIR/.lock, holding {"host", "pid", "since"} as JSON.
    A context manager: acquired on enter (ConfigError if another process holds it), released on exit."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        if self._fd is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by a live process
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"workdir {self.workdir} is in use by another run ({_describe(holder)}; lock file {self.path}); "
                "wait for it to end or stop it, or use another --workdir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder; the (empty) file stays: unlinking a flock file races with openers
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _NoLock:
    """What the other processes of a multi-process run hold: nothing (process 0 holds the run's lock)."""

    held = False

    def acquire(self) -> "_NoLock":
        return self

    def release(self) -> None:
        pass


@contextlib.contextmanager
def lock_workdir(workdir, *, enabled: bool | None = None):
    """Hold the run's lock on `workdir` for the `with` block; by default only process 0 of a multi-process run
    locks, and its answer is shared, so that when it is refused every process stops with the same message
    (rather than the others waiting for process 0 at their next collective)."""
    if enabled is None:
        enabled = jax.process_index() == 0
    if not enabled:
        lock = _NoLock()
    else:
        lock = storage.BucketLock(workdir) if storage.is_remote(workdir) else WorkdirLock(workdir)
    refused = None
    try:
        lock.acquire()
    except ConfigError as e:
        refused = e
    if jax.process_count() > 1:
        held_by_0 = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
        if refused is None and not int(held_by_0):
            refused = ConfigError(f"workdir {workdir} is in use by another run (refused on process 0; see its "
                                  "message); wait for it to end or stop it, or use another --workdir")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        lock.release()


def _read_holder(fd: int) -> dict:
    """The holder's {"host", "pid"}; a holder that has just taken the lock may not have written it yet."""
    for _ in range(20):
        try:
            data = os.pread(fd, 4096, 0)
            info = json.loads(data) if data.strip() else None
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}" + (
        f", since {holder['since']}" if holder.get("since") else "")
