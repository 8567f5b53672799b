"""Measuring one case: inputs, the timed pass, time, peak memory (the correctness gate: `lsr.bench.gate`).

How: device work is asynchronous, so every timed call synchronises the device before the clock is
read; warm-up runs come first (allocator, lazy initialisation, compilation), the first one's duration
kept apart (`first_call_s`); the number of runs is chosen by time, not fixed; the raw samples are
kept, and the median and interquartile range are reported with the run and thread counts, with a
warning when the spread is wide. Peak memory is the peak of bytes allocated above what existed
before the pass: `torch.cuda.max_memory_allocated` on CUDA, and on CPU its exact twin, a running sum
over the profiler's allocation and free events in time order.
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

    @property
    def options(self) -> dict:
        """The loss's keyword arguments besides the logits, targets, smoothing and reduction."""
        weight = {} if self.weight is None else {"weight": self.weight}
        return {"ignore_index": IGNORE_INDEX, **weight}

    def copy(self) -> Problem:
        """Logits of its own, for an implementation that overwrites them with the gradient.

        They are a non-leaf (a clone of a leaf), as a layer's output is in training: an in-place
        loss refuses leaf logits, which would become their own gradient.
        """
        leaf = self.logits.detach().clone().requires_grad_(True)
        return Problem(leaf.clone(), self.target, self.weight)


class Pass:
    """The callable a case times: forward, backward or both, for an implementation or a floor.

    forward: the loss with autograd recording, as in training (saved tensors count in its memory).
    backward: `torch.autograd.grad` of a graph built beforehand (kept between runs, not timed).
    The gradient is returned, never accumulated into `.grad`, so repeated runs do the same work.
    `impl` is None for a floor: FLOOR writes exp(z) into a buffer kept across calls, FLOOR_ALLOC
    into a new tensor each call. `loss_fn` replaces the implementation's function (tests plant
    wrong or failing ones with it).
    """

    def __init__(
        self, case: Case, problem: Problem, impl: Implementation | None, loss_fn: LossFn | None = None
    ):
        if impl is not None and impl.inplace_backward:
            problem = problem.copy()  # later runs see the gradient as logits: the work is the same
        self.case, self.problem = case, problem
        self.device = problem.logits.device
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

    def __call__(self):
        out = self._step(self)
        synchronize(self.device)
        return out


# A spread wider than this fraction of the median makes a measurement's warning (as torch.utils.benchmark).
WIDE_IQR = 0.1


def relative_iqr(median_s: float, iqr_s: float | None) -> float:
    """The interquartile range as a fraction of the median: the noise a measurement saw."""
    return (iqr_s or 0.0) / median_s if median_s > 0 else float("inf")


@dataclass(frozen=True)
class Measurement:
    """The raw samples of one timed call (seconds per call, each the mean of a block of runs).

    Median and IQR are computed from them on demand; `warning` says when the spread is wide.

    `first_call_s` is the first call's duration (compilation and warm-up included), kept out of the
    samples.

    Example:
        >>> m = Measurement((1.0, 1.05, 0.95, 1.0, 2.0), runs_per_sample=4, threads=2)
        >>> m.median, m.runs, round(m.relative_iqr, 2), m.warning
        (1.0, 20, 0.05, None)
        >>> Measurement((1.0, 2.0, 3.0), runs_per_sample=1, threads=2).warning
        'noisy: IQR 50% of the median over 3 samples'
    """

    samples: tuple[float, ...]
    runs_per_sample: int
    threads: int
    first_call_s: float | None = None

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
    def relative_iqr(self) -> float:
        return relative_iqr(self.median, self.iqr)

    @property
    def warning(self) -> str | None:
        if self.relative_iqr <= WIDE_IQR:
            return None
        return f"noisy: IQR {self.relative_iqr:.0%} of the median over {len(self.samples)} samples"


def timed_call(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` (which synchronises the device itself) takes; its result is dropped."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pass(
    fn: Callable[[], object],
    min_time: float = 0.5,
    min_samples: int = 7,
    max_time: float = 20.0,
    first_call_s: float | None = None,
) -> Measurement:
    """Time one call of `fn`, which synchronises the device itself, at torch's current thread count.

    Warm-up: until a call has been made twice (allocator, lazy initialisation, compilation); the
    first call's duration is kept as `first_call_s`. A caller that made that first call itself (the
    sweep does, before the gate, so that it includes compilation) passes its duration instead. Each
    sample then runs a block of calls long enough (>= 1 ms) for the clock to resolve, and samples are
    taken until both `min_samples` and `min_time` are reached, or `max_time` passes with 3 samples.
    """
    if first_call_s is None:
        first_call_s = timed_call(fn)
    one_call = timed_call(fn)
    per_block = max(1, int(1e-3 / max(one_call, 1e-9)))
    samples: list[float] = []
    began = time.perf_counter()
    while True:
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        samples.append((time.perf_counter() - start) / per_block)
        elapsed = time.perf_counter() - began
        if (len(samples) >= min_samples and elapsed >= min_time) or (
            elapsed >= max_time and len(samples) >= 3
        ):
            break
    return Measurement(tuple(samples), per_block, torch.get_num_threads(), first_call_s)


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
}
DEFAULT_PEAK_FACTOR = 4.0  # an implementation not listed: assume the dense one's appetite


def estimated_peak_bytes(case: Case) -> int:
    """What `case` needs at its peak: logits and targets, and the implementation's factor x logits."""
    logits = case.batch * case.classes * DTYPES[case.dtype].itemsize
    factor = PEAK_FACTOR.get(case.implementation, DEFAULT_PEAK_FACTOR)
    return int(logits * (1 + factor)) + case.batch * 8


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
