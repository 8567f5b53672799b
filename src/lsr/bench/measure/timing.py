"""Timing one pass: warm-up first, the number of calls chosen by time, the raw samples kept, the
median and interquartile range reported with the run and thread counts, and a warning when the
spread is wide.

Clocks. CPU (and MPS): the host clock around calls that synchronise the device (timer
"perf_counter"), blocks of calls of at least 1 ms. CUDA (timer "cuda-events"): a pair of CUDA events
around each call, recorded on the stream, so the time is the device's; before each call the L2 cache
is flushed (a buffer larger than L2 is zeroed, as Triton's `do_bench` does; `L2_FLUSH`), outside the
events, so that no call finds the logits in cache from the call before, as none would in training.
Beside it two figures: the host clock around a synchronised call (`wall_median_s`, a cross-check
that includes launch and synchronisation latency) and the host time to enqueue a call without waiting
(`host_s`): where host_s is close to the device time, the case is launch-bound.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsr.bench.measure.problem import prepare_if_asked, synchronize

# A spread wider than this fraction of the median makes a measurement's warning (as torch.utils.benchmark).
WIDE_IQR = 0.1


def relative_iqr(median_s: float, iqr_s: float | None) -> float:
    """The interquartile range as a fraction of the median: the noise a measurement saw."""
    return (iqr_s or 0.0) / median_s if median_s > 0 else float("inf")


PERF_COUNTER, CUDA_EVENTS = "perf_counter", "cuda-events"  # the values of the results' timer column


@dataclass(frozen=True)
class Measurement:
    """The raw samples of one timed call (seconds per call, each the mean of a block of runs).

    Median and IQR are computed from them on demand; `warning` says when the spread is wide.

    `first_call_s` is the first call's duration (compilation and warm-up included), kept out of the
    samples. `timer` says what the samples were read from (PERF_COUNTER or CUDA_EVENTS); with CUDA
    events, `wall_samples` are host-clock times of synchronised calls (the cross-check) and
    `host_samples` the host times to enqueue one call without waiting.

    Example:
        >>> m = Measurement((1.0, 1.05, 0.95, 1.0, 2.0), runs_per_sample=4, threads=2)
        >>> m.median, m.runs, round(m.relative_iqr, 2), m.warning
        (1.0, 20, 0.05, None)
        >>> Measurement((1.0, 2.0, 3.0), runs_per_sample=1, threads=2).warning
        'noisy: IQR 50% of the median over 3 samples'
        >>> m.row_fields()["timer"], m.row_fields()["host_s"]
        ('perf_counter', None)
    """

    samples: tuple[float, ...]
    runs_per_sample: int
    threads: int
    first_call_s: float | None = None
    timer: str = PERF_COUNTER
    wall_samples: tuple[float, ...] = ()
    host_samples: tuple[float, ...] = ()

    @property
    def runs(self) -> int:
        return len(self.samples) * self.runs_per_sample

    @functools.cached_property
    def median(self) -> float:
        return statistics.median(self.samples)

    @functools.cached_property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        quartiles = statistics.quantiles(self.samples, n=4, method="inclusive")
        return quartiles[2] - quartiles[0]

    @property
    def wall_median(self) -> float | None:
        return statistics.median(self.wall_samples) if self.wall_samples else None

    @property
    def host_median(self) -> float | None:
        return statistics.median(self.host_samples) if self.host_samples else None

    @property
    def relative_iqr(self) -> float:
        return relative_iqr(self.median, self.iqr)

    @property
    def warning(self) -> str | None:
        if self.relative_iqr <= WIDE_IQR:
            return None
        return f"noisy: IQR {self.relative_iqr:.0%} of the median over {len(self.samples)} samples"

    def row_fields(self) -> dict:
        """The results columns this measurement fills (`lsr.bench.data`)."""
        return {
            "median_s": self.median,
            "iqr_s": self.iqr,
            "runs": self.runs,
            "threads": self.threads,
            "first_call_s": self.first_call_s,
            "timer": self.timer,
            "wall_median_s": self.wall_median,
            "host_s": self.host_median,
        }


def timed_call(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` (which synchronises the device itself) takes; its result is dropped.
    `fn.prepare()` runs first, untimed, where `fn` asks for it."""
    prepare_if_asked(fn)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# Whether timed calls on a device flush its L2 cache first (recorded in metadata.json). On by default;
# `lsr-bench run --l2-flush off` sets L2_FLUSH_VARIABLE too, so that --isolate's children follow it.
L2_FLUSH_VARIABLE = "LSR_L2_FLUSH"
L2_FLUSH = {"cuda": os.environ.get(L2_FLUSH_VARIABLE, "on") != "off"}
L2_FLUSH_MIN_BYTES = 256 * 2**20  # Triton's do_bench zeroes 256 MiB


def l2_cache_bytes(device: torch.device | str) -> int | None:
    """The CUDA device's L2 cache size in bytes (None elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def l2_flush_bytes(device: torch.device | str) -> int:
    """The flush buffer: at least twice the L2 cache, and at least L2_FLUSH_MIN_BYTES."""
    return max(L2_FLUSH_MIN_BYTES, 2 * (l2_cache_bytes(device) or 0))


class L2Flush:
    """Calling it evicts the device's L2 cache: it zeroes a buffer of `l2_flush_bytes`, kept for reuse."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(l2_flush_bytes(device), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def _is_done(samples: list, elapsed: float, min_samples: int, min_time: float, max_time: float) -> bool:
    return (len(samples) >= min_samples and elapsed >= min_time) or (
        elapsed >= max_time and len(samples) >= 3
    )


def time_pass(
    fn: Callable[[], object],
    min_time: float = 0.5,
    min_samples: int = 7,
    max_time: float = 20.0,
    first_call_s: float | None = None,
    l2_flush: bool | None = None,
) -> Measurement:
    """Time one call of `fn`, which synchronises the device itself, at torch's current thread count.

    Warm-up: until a call has been made twice (allocator, lazy initialisation, compilation); the
    first call's duration is kept as `first_call_s`. A caller that made that first call itself (the
    sweep does, before the gate, so that it includes compilation) passes its duration instead.
    Samples are taken until both `min_samples` and `min_time` are reached, or `max_time` passes with
    3 samples.

    On the host clock (a CPU `TimedPass`, or any plain function), each sample runs a block of calls long
    enough (>= 1 ms) for the clock to resolve; where `fn.prepares`, each sample is one call, after
    its untimed `fn.prepare()`. A CUDA `TimedPass` (one with `device` and `enqueue`) is timed with CUDA
    events (`time_on_cuda`), flushing L2 before each call unless `l2_flush` is False (default
    `L2_FLUSH`).
    """
    device = getattr(fn, "device", None)
    if device is not None and device.type == "cuda" and hasattr(fn, "enqueue"):
        flush = L2_FLUSH.get("cuda", False) if l2_flush is None else l2_flush
        return time_on_cuda(fn, min_time, min_samples, max_time, first_call_s, flush)
    if first_call_s is None:
        first_call_s = timed_call(fn)
    one_call = timed_call(fn)
    prepares = getattr(fn, "prepares", False)
    per_block = 1 if prepares else max(1, int(1e-3 / max(one_call, 1e-9)))
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        if prepares:
            samples.append(timed_call(fn))
        else:
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            samples.append((time.perf_counter() - start) / per_block)
        if _is_done(samples, time.perf_counter() - began, min_samples, min_time, max_time):
            break
    return Measurement(tuple(samples), per_block, torch.get_num_threads(), first_call_s)


# Synchronised calls timed on the host clock beside the events: at least this many, and for at least
# this fraction of min_time.
WALL_SAMPLES, WALL_FRACTION = 3, 0.2
MAX_BATCH = 16


def time_on_cuda(
    fn,
    min_time: float = 0.5,
    min_samples: int = 7,
    max_time: float = 20.0,
    first_call_s: float | None = None,
    l2_flush: bool = True,
) -> Measurement:
    """`time_pass` for a CUDA `TimedPass`: device time between CUDA events, host time, wall time.

    Before each call, untimed: `fn.prepare()` where it asks, then (with `l2_flush`) a buffer of
    `l2_flush_bytes` is zeroed, evicting the logits from L2. Then, on the current stream: start event,
    `fn.enqueue()` (its host duration is the call's host time), end event. With neither, calls run
    in blocks of >= 1 ms between one pair of events. Calls are enqueued in batches and the device is
    synchronised once per batch, so that the host runs ahead of the device as in training: a case
    whose device time is no more than its host time is launch-bound. Then a few calls, each
    synchronised, timed on the host clock (`wall_samples`, the cross-check).
    """
    device = fn.device
    flush = L2Flush(device) if l2_flush else None
    prepares = getattr(fn, "prepares", False)

    def ready() -> None:  # everything a call needs before its start event, never timed
        prepare_if_asked(fn)
        if flush is not None:
            flush()

    def wall_call() -> float:  # a call on the host clock, after its preparation has finished
        ready()
        synchronize(device)
        start = time.perf_counter()
        fn()  # synchronises
        return time.perf_counter() - start

    if first_call_s is None:
        first_call_s = wall_call()
    one_call = wall_call()
    per_block = 1 if (prepares or flush is not None) else max(1, int(1e-3 / max(one_call, 1e-9)))
    # Calls between two synchronisations: about a tenth of min_time of device work, and at most
    # MAX_BATCH, so that the launch queue (about 1000 kernels) never fills: a full one would make
    # enqueueing wait for the device, and host_s read like device time.
    batch = max(1, min(MAX_BATCH, int(0.1 * min_time / max(one_call * per_block, 1e-9))))
    samples: list[float] = []
    hosts: list[float] = []
    began = time.perf_counter()
    while True:
        events = []
        for _ in range(batch):
            if per_block == 1:
                ready()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            host_start = time.perf_counter()
            for _ in range(per_block):
                fn.enqueue()
            hosts.append((time.perf_counter() - host_start) / per_block)
            end.record()
            events.append((start, end))
        synchronize(device)
        samples += [start.elapsed_time(end) / 1e3 / per_block for start, end in events]  # ms -> s
        if _is_done(samples, time.perf_counter() - began, min_samples, min_time, max_time):
            break
    walls: list[float] = []
    began = time.perf_counter()
    while len(walls) < WALL_SAMPLES or time.perf_counter() - began < WALL_FRACTION * min_time:
        walls.append(wall_call())
        if time.perf_counter() - began >= max_time:
            break
    return Measurement(
        tuple(samples),
        per_block,
        torch.get_num_threads(),
        first_call_s,
        timer=CUDA_EVENTS,
        wall_samples=tuple(walls),
        host_samples=tuple(hosts),
    )
