"""Part of a sweep in a child process: a case that exhausts memory or kills the interpreter costs its
row, not the sweep.

The child is a fresh interpreter, `python -m lsr.bench.sweep.isolate FD` (nothing inherited from the
parent's state, safe with CUDA, and unlike multiprocessing's spawn it never re-runs the parent's
main script). It reads a pickled job from stdin, the parent's sys.path then (function, arguments),
and writes back to FD, pickled one at a time, what the generator function yields, so the items made
before a death are kept.
Functions in the job are pickled by reference: they must be importable (defined at a module's top
level, not in __main__).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator


class ChildDied(RuntimeError):
    """The child stopped before its function was done: killed by a signal, exited, or raised."""

    def __init__(self, exitcode: int | None, raised: str | None = None):
        self.exitcode, self.raised = exitcode, raised
        super().__init__(self.outcome()["message"])

    def outcome(self) -> dict:
        """The status and message of the row the child was working on."""
        if self.raised is not None:
            return {"status": "error", "message": f"in the child process: {self.raised}"}
        if self.exitcode is not None and self.exitcode < 0:
            name = signal.Signals(-self.exitcode).name
            if -self.exitcode == signal.SIGKILL:  # what the kernel's out-of-memory killer sends
                # the kernel's OOM killer, or a person: both look the same from here
                return {"status": "oom", "message": f"child killed by {name}: out of memory, or by hand"}
            return {"status": "crashed", "message": f"child killed by {name}"}
        return {"status": "crashed", "message": f"child exited with code {self.exitcode}"}


def stream(fn: Callable[..., Iterable], *args) -> Iterator:
    """Yield what `fn(*args)` yields, computed in a child process; raise ChildDied when the child
    stops early. The child is ended if the caller stops early or is interrupted."""
    # Pickled before the child starts, so an unpicklable job raises here; the function apart, for
    # the child to unpickle it once it has the parent's sys.path.
    job = pickle.dumps((sys.path, pickle.dumps((fn, args))))
    read_fd, write_fd = os.pipe()
    # Its own session: Ctrl-C reaches the parent only, which ends the child.
    child = subprocess.Popen(
        [sys.executable, "-m", "lsr.bench.sweep.isolate", str(write_fd)],
        stdin=subprocess.PIPE,
        pass_fds=(write_fd,),
        start_new_session=True,
    )
    os.close(write_fd)  # the child holds the only writing end now: its death ends the stream
    receiver = os.fdopen(read_fd, "rb")
    try:
        child.stdin.write(job)
        child.stdin.close()
        while True:
            try:
                kind, payload = pickle.load(receiver)
            except (EOFError, pickle.UnpicklingError):  # the end, or an item cut short by a death
                break
            if kind == "raised":
                raise ChildDied(None, raised=payload)
            yield payload
        if child.wait() != 0:
            raise ChildDied(child.returncode)
    except BrokenPipeError:  # it died before reading its job
        raise ChildDied(child.wait()) from None
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        receiver.close()


def main(fd: int) -> None:
    with os.fdopen(fd, "wb") as sender:

        def send(kind: str, payload) -> None:
            pickle.dump((kind, payload), sender)
            sender.flush()  # now: the parent keeps what it received if this process dies next

        try:
            path, job = pickle.load(sys.stdin.buffer)
            sys.path[:] = path  # the parent's, so that its functions import here too
            fn, args = pickle.loads(job)
            for item in fn(*args):
                send("item", item)
        except Exception as e:  # a bug, not a case's failure (those are rows): report it, then exit
            send("raised", traceback.format_exception_only(type(e), e)[-1].strip())


if __name__ == "__main__":
    main(int(sys.argv[1]))
