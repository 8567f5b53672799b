"""Peak memory of a pass: bytes allocated above what existed before it. CUDA:
`torch.cuda.max_memory_allocated`; CPU: its exact twin, a running sum over the profiler's allocation
and free events in time order; and the process's peak resident set (Linux), a coarser figure. Also
what a case is expected to need, so that a sweep does not start one that cannot fit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

import lsr
import lsr.heads
from lsr.bench.data import FLOOR_PEAK_FACTOR, Case
from lsr.bench.measure.head import estimated_head_peak_bytes
from lsr.bench.measure.problem import prepare_if_asked
from lsr.bench.measure.timing import L2_FLUSH, l2_flush_bytes
from lsr.types import DTYPES


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines to fd 2; keep them off the progress bar."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Exact peak of CPU tensor bytes allocated above the start while `fn` runs (results kept alive)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prepare_if_asked(fn)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result  # freed after the profile: what the pass returns counts in its peak
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        # Negative for frees. The profiler reports the free of a tensor older than the pass only when
        # its allocation was seen by an earlier profile in this process (it knows the size then), so
        # such a free may or may not appear: never let it take the count below what the pass
        # itself holds, 0 at the least
        current = max(0, current + event.nbytes())
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    prepare_if_asked(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type == "cpu":
        return cpu_peak_bytes(fn)
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device)
    return None  # mps has no per-pass peak counter


def peak_rss_bytes(fn: Callable[[], object]) -> int | None:
    """The process's peak resident set while `fn` runs (Linux: VmHWM, reset through clear_refs)."""
    prepare_if_asked(fn)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    result = fn()
    del result
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def estimated_peak_bytes(case: Case) -> int:
    """What `case` needs at its peak: logits and targets, the implementation's factor x logits, and
    on CUDA the L2 flush buffer when flushing; for a head case, `estimated_head_peak_bytes`."""
    flushing = case.device == "cuda" and L2_FLUSH.get("cuda", False) and torch.cuda.is_available()
    flush = l2_flush_bytes(case.device) if flushing else 0
    if case.is_head:
        impl = None if case.is_floor else lsr.heads.get(case.implementation)
        return estimated_head_peak_bytes(case, impl) + flush
    logits = case.batch * case.classes * DTYPES[case.dtype].itemsize
    factor = FLOOR_PEAK_FACTOR if case.is_floor else lsr.get(case.implementation).peak_factor
    return int(logits * (1 + factor)) + case.batch * 8 + flush
