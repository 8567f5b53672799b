"""Measuring one case: inputs, the timed pass, time, peak memory (the correctness gate: `lsr.bench.gate`).

How: device work is asynchronous, so no clock is read before the device has done the work; warm-up
runs come first (allocator, lazy initialisation, compilation), the first one's duration kept apart
(`first_call_s`); the number of runs is chosen by time, not fixed; the raw samples are kept, and the
median and interquartile range are reported with the run and thread counts, with a warning when the
spread is wide. Peak memory is the peak of bytes allocated above what existed before the pass:
`torch.cuda.max_memory_allocated` on CUDA, and on CPU its exact twin, a running sum over the
profiler's allocation and free events in time order.

Clocks. CPU (and MPS): the host clock around calls that synchronise the device (timer
"perf_counter"), blocks of calls of at least 1 ms. CUDA (timer "cuda-events"): a pair of CUDA events
around each call, recorded on the stream, so the time is the device's; before each call the L2 cache
is flushed (a buffer larger than L2 is zeroed, as Triton's `do_bench` does; `L2_FLUSH`), outside the
events, so that no call finds the logits in cache from the call before, as none would in training.
Beside it two figures: the host clock around a synchronised call (`wall_median_s`, a cross-check
that includes launch and synchronisation latency) and the host time to enqueue a call without waiting
(`host_s`): where host_s is close to the device time, the case is launch-bound.

Per-call preparation (`Pass.prepare`), never timed: an implementation that writes into its logits
during the forward pass (`gradient_in_forward`, and on CUDA also `inplace_backward`, as Liger-Kernel
does) gets fresh logits, copied from the pristine ones, before every call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import lsr

# The gate lives in lsr.bench.gate; re-exported here for the runner and the suites that call it here.
from lsr.bench.gate import GATE_ROWS as GATE_ROWS
from lsr.bench.gate import GATE_TOLERANCE as GATE_TOLERANCE
from lsr.bench.gate import GateFailure as GateFailure
from lsr.bench.gate import check_against_reference as check_against_reference
from lsr.bench.grid import present_devices
from lsr.bench.results import FLOOR, FLOOR_ALLOC, IGNORE_INDEX, Case
from lsr.registry import Implementation
from lsr.types import DTYPES, LossFn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Elements of the float32 blocks the device draws logits in (256 MiB).
MAKE_BLOCK_ELEMENTS = 2**26


@dataclass
class Problem:
    """Random logits (normal, never zeros), targets and class weights for one size, ignore fraction and
    weighting, made once and reused by its cases.

    A fraction `case.ignore_fraction` of the targets (rounded; never all), rows chosen at random, is
    IGNORE_INDEX; with `case.weighted`, the class weights are uniform in [0.5, 1.5) (float32 on the
    device). The logits and the other targets are those of the same size without either, for one seed.
    """

    logits: torch.Tensor  # (batch, classes), requires_grad
    target: torch.Tensor
    weight: torch.Tensor | None = None  # (classes,), when weighted

    @classmethod
    def make(cls, case: Case, logit_std: float = 2.0, seed: int = 0) -> Problem:
        device = torch.device(case.device)
        if device.type == "cuda":
            return cls._make_on_device(case, logit_std, seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        logits = torch.randn(case.batch, case.classes, generator=gen) * logit_std
        target = torch.randint(0, case.classes, (case.batch,), generator=gen)
        # One row is always left, for the mean to average.
        n_ignored = min(round(case.ignore_fraction * case.batch), case.batch - 1)
        ignored = torch.randperm(case.batch, generator=gen)[:n_ignored]
        target[ignored] = IGNORE_INDEX
        weight = torch.rand(case.classes, generator=gen) + 0.5 if case.weighted else None
        logits = logits.to(device=device, dtype=DTYPES[case.dtype]).requires_grad_(True)
        return cls(logits, target.to(device), None if weight is None else weight.to(device))

    @classmethod
    def _make_on_device(cls, case: Case, logit_std: float, seed: int) -> Problem:
        """As `make`, drawn on the device by its own generator: no N x C tensor on the host (65536 x
        131072 float32 logits would need 34 GB of host memory and minutes to copy). The logits are
        drawn in float32 a block of rows at a time, straight into the case's dtype, so that making
        them needs the logits and one block, never a float32 copy of the whole. Other numbers than
        the CPU's for the same seed (another generator)."""
        device = torch.device(case.device)
        gen = torch.Generator(device=device).manual_seed(seed)
        logits = torch.empty(case.batch, case.classes, dtype=DTYPES[case.dtype], device=device)
        rows = max(1, MAKE_BLOCK_ELEMENTS // case.classes)
        for start in range(0, case.batch, rows):
            block = logits[start : start + rows]
            block.copy_(torch.randn(block.shape, generator=gen, device=device).mul_(logit_std))
        target = torch.randint(0, case.classes, (case.batch,), generator=gen, device=device)
        n_ignored = min(round(case.ignore_fraction * case.batch), case.batch - 1)
        ignored = torch.randperm(case.batch, generator=gen, device=device)[:n_ignored]
        target[ignored] = IGNORE_INDEX
        weight = torch.rand(case.classes, generator=gen, device=device) + 0.5 if case.weighted else None
        return cls(logits.requires_grad_(True), target, weight)

    @property
    def options(self) -> dict:
        """The loss's keyword arguments besides the logits, targets, smoothing and reduction."""
        weight = {} if self.weight is None else {"weight": self.weight}
        return {"ignore_index": IGNORE_INDEX, **weight}

    def copy(self) -> Problem:
        """Logits of its own, for an implementation that overwrites them with the gradient.

        They are a non-leaf (a clone of the leaf logits), as a layer's output is in training: an
        in-place loss refuses leaf logits, which would become their own gradient. One copy's memory:
        the leaf they come from is this problem's own.
        """
        logits = self.logits if self.logits.requires_grad else self.logits.detach().requires_grad_(True)
        return Problem(logits.clone(), self.target, self.weight)


def writes_logits_per_call(impl: Implementation | None, device: torch.device) -> bool:
    """Whether every timed call of `impl` on `device` gets fresh logits (`Pass.prepare`).

    Always for `gradient_in_forward`: its forward overwrites the logits, and each call must see real
    ones. On CUDA also for `inplace_backward` (fused-exact-inplace, and Liger-Kernel, which writes in
    its forward): every call is bracketed alone there anyway, so the copy costs no timing precision.
    On CPU an `inplace_backward` implementation keeps one copy, later calls reading the gradient as
    logits (the same work), so that its calls are timed in blocks as the committed CPU results were.
    """
    if impl is None:
        return False
    return impl.gradient_in_forward or (impl.inplace_backward and device.type == "cuda")


class Pass:
    """The callable a case times: forward, backward or both, for an implementation or a floor.

    forward: the loss with autograd recording, as in training (saved tensors count in its memory).
    backward: `torch.autograd.grad` of a graph built beforehand (kept between runs, not timed).
    The gradient is returned, never accumulated into `.grad`, so repeated runs do the same work.
    `impl` is None for a floor: FLOOR writes exp(z) into a buffer kept across calls, FLOOR_ALLOC
    into a new tensor each call. `loss_fn` replaces the implementation's function (tests plant
    wrong or failing ones with it).

    Calling it runs the pass and synchronises the device; `enqueue` runs it without waiting (CUDA
    timing). Where `prepares` is true, `prepare()` must run before each call, outside the timed
    region (the meters here do): it gives the call fresh logits (`writes_logits_per_call`).
    """

    def __init__(
        self, case: Case, problem: Problem, impl: Implementation | None, loss_fn: LossFn | None = None
    ):
        self.device = problem.logits.device
        self.prepares = writes_logits_per_call(impl, self.device)
        self.source = problem  # its logits are never written: each call's fresh logits copy them
        if impl is not None and (impl.inplace_backward or impl.gradient_in_forward):
            problem = problem.copy()  # without `prepares`, later runs see the gradient as logits: same work
        self.case, self.problem = case, problem
        if impl is None:
            if case.implementation == FLOOR:
                self.buffer = torch.empty_like(problem.logits, requires_grad=False)
            self._step = {FLOOR: Pass._floor, FLOOR_ALLOC: Pass._floor_alloc}[case.implementation]
            return
        self.loss_fn = loss_fn or impl.loss
        # Functions, not bound methods: a Pass holding its own method would be a reference cycle,
        # its tensors freed only by the garbage collector.
        self._step = {"forward": Pass._forward, "backward": Pass._backward, "forward+backward": Pass._both}[
            case.pass_
        ]
        if case.pass_ == "backward":
            self.loss = self._loss()

    def prepare(self) -> None:
        """Fresh logits for the next call (where `prepares`): the last call's, which hold a gradient, go
        first, so that two copies never coexist; a new clone of the pristine leaf, so that no call's
        autograd history reaches the next."""
        if self.prepares:
            self.problem.logits = None
            self.problem = self.source.copy()

    def _loss(self) -> torch.Tensor:
        problem = self.problem
        return self.loss_fn(problem.logits, problem.target, self.case.smoothing, "mean", **problem.options)

    def _floor(self):
        with torch.no_grad():
            return torch.exp(self.problem.logits, out=self.buffer)

    def _floor_alloc(self):
        with torch.no_grad():
            return torch.exp(self.problem.logits)

    def _forward(self):
        return self._loss()

    def _backward(self):
        return torch.autograd.grad(self.loss, self.problem.logits, retain_graph=True)

    def _both(self):
        return torch.autograd.grad(self._loss(), self.problem.logits)

    def enqueue(self):
        """The pass, without waiting for the device."""
        return self._step(self)

    def __call__(self):
        out = self._step(self)
        synchronize(self.device)
        return out


def _prepare(fn: Callable[[], object]) -> None:
    """Run `fn.prepare()` where `fn` asks for it (a `Pass` with `prepares`); never timed."""
    if getattr(fn, "prepares", False):
        fn.prepare()


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
        """The results columns this measurement fills (`lsr.bench.results`)."""
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
    _prepare(fn)
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

    On the host clock (a CPU `Pass`, or any plain function), each sample runs a block of calls long
    enough (>= 1 ms) for the clock to resolve; where `fn.prepares`, each sample is one call, after
    its untimed `fn.prepare()`. A CUDA `Pass` (one with `device` and `enqueue`) is timed with CUDA
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
    """`time_pass` for a CUDA `Pass`: device time between CUDA events, host time, wall time.

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
        _prepare(fn)
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

    _prepare(fn)
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
        current += event.nbytes()  # negative for frees, including of tensors older than the pass
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    _prepare(fn)
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
    _prepare(fn)
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


# Bytes a case allocates beyond its inputs, in logits, by registry name (the floor: its buffer). From
# the measured peaks of forward+backward (and the gate, which is one of them), rounded up: an
# estimate that only keeps a sweep from starting a case that cannot fit, never a measurement.
PEAK_FACTOR = {
    "floor": 1.0,
    "floor-alloc": 1.0,
    "native": 3.0,
    "dense": 4.0,
    "sparse": 3.0,
    "fused-exact": 1.1,
    "fused-sparse": 1.1,
    "fused-exact-inplace": 2.1,  # the benchmark gives it a copy of the logits to overwrite
    "native-compiled": 1.1,  # measured on CPU: forward+backward peaks at the gradient alone
    "liger": 2.1,  # writes its gradient into a copy of the logits, as fused-exact-inplace
    # Each call gets fresh logits to overwrite (Pass.prepare), and the gate one more copy beside them.
    "fused-exact-onepass": 2.1,
    "fused-sparse-onepass": 2.1,
}
DEFAULT_PEAK_FACTOR = 4.0  # an implementation not listed: assume the dense one's appetite


def estimated_peak_bytes(case: Case) -> int:
    """What `case` needs at its peak: logits and targets, the implementation's factor x logits, and
    on CUDA the L2 flush buffer when flushing."""
    logits = case.batch * case.classes * DTYPES[case.dtype].itemsize
    factor = PEAK_FACTOR.get(case.implementation, DEFAULT_PEAK_FACTOR)
    flushing = case.device == "cuda" and L2_FLUSH.get("cuda", False) and torch.cuda.is_available()
    flush = l2_flush_bytes(case.device) if flushing else 0
    return int(logits * (1 + factor)) + case.batch * 8 + flush


def refusal(case: Case) -> dict | None:
    """Why the implementation cannot take `case` at all (a status and message), or None."""
    if case.device not in present_devices():
        return {"status": "not-available", "message": f"this machine has no {case.device} device"}
    if case.is_floor:
        return None
    impl = lsr.get(case.implementation)
    if not impl.runs_on(case.device):
        return {"status": "not-available", "message": f"{impl.name} does not run on {case.device} here"}
    reason = impl.unsupported(
        classes=case.classes,
        dtype=case.dtype,
        reduction="mean",  # the timed one
        weighted=case.weighted,
        ignoring=case.ignore_fraction > 0,
    )
    if reason:
        return {"status": "unsupported", "message": reason}
    if not impl.can_repeat_backward and case.pass_ == "backward":
        return {"status": "unsupported", "message": f"{impl.name}'s backward cannot run twice on one graph"}
    return None
