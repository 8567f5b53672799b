"""One writer per output directory: a sweep holds a lock on OUT/.lsr-bench.lock while it writes there.

A sweep sharded over the ranks of a launch is one writer: `run_lock` admits the ranks of one run
(by its run id, named in the lock file) and refuses every other writer, as `output_lock` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import psutil

LOCK_FILE = ".lsr-bench.lock"


class SweepLocked(RuntimeError):
    """Another process is writing a sweep into the same output directory."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder  # what the lock file says of its holder


def _lock(path: Path) -> int:
    """A descriptor of `path` holding its exclusive lock; SweepLocked, naming the holder, if taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process starting up"
            os.close(fd)
            raise SweepLocked(
                f"another sweep is writing to {path.parent}: {holder}; "
                "wait for it to end or choose another --out",
                holder,
            ) from None
        try:  # a holder that was ending may have removed the file we opened: lock the one there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def output_lock(out_dir: Path, run: str = "") -> Iterator[None]:
    """Hold out_dir for one sweep. The lock file names its holder while it runs (after `run`, the
    run's name for `run_lock`) and goes with it; the kernel drops the lock however the holder ends,
    so a file left by a killed one never blocks."""
    path = out_dir / LOCK_FILE
    fd = _lock(path)
    try:
        command = " ".join(shlex.join(psutil.Process().cmdline()).split())[:300]  # one line
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{run}pid {os.getpid()}: {command}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked, so no one locks the file being removed
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def run_lock(out_dir: Path, run_id: str, who: str = "") -> Iterator[bool]:
    """Hold out_dir for the ranks of run `run_id`: the first of them takes the lock, naming the run
    (and `who`, e.g. "rank 0 of 2") in the lock file; the others find the run named there and are
    admitted while its holder holds it; any other writer is refused (SweepLocked), sharded or not.
    Yields whether this process holds the lock: the ranks of one run must take it in turn (rank
    order), and its holder keep it until every rank is done writing."""
    name = f"run {run_id}, "
    with contextlib.ExitStack() as holding:
        try:
            holding.enter_context(output_lock(out_dir, run=f"{name}{who}{', ' if who else ''}"))
            holder = True
        except SweepLocked as e:
            if not e.holder.startswith(name):
                raise
            holder = False
        yield holder
