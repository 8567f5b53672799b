"""One case, measured: gated, timed and metered, its failure recorded in its row, never raised; and
a list of cases measured in order, each set of inputs made once, in this process or in an isolated
child process (`lsr.bench.sweep.isolate`) so that a case that kills its process costs its row only.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator

import torch

from lsr.bench import measure
from lsr.bench.data import BUSY_LOAD, FLOOR, Case, new_row
from lsr.bench.sweep import isolate as isolation
from lsr.bench.sweep.grid import implementation_of, refusal
from lsr.types import LossFn


def is_out_of_memory(error: BaseException) -> bool:
    # CUDA's and MPS's allocators say "out of memory"; PyTorch's CPU allocator "can't allocate memory"
    # or "not enough memory" in a RuntimeError.
    phrases = ("out of memory", "can't allocate memory", "not enough memory")
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(
        phrase in str(error).lower() for phrase in phrases
    )


_commit = functools.cache(measure.git_commit)  # one per process: two git calls, not two per row


def make_problem(case: Case, logit_std: float):
    """The inputs of `case`: logits and targets, or for a head case hidden states, an lm_weight and targets."""
    make = measure.HeadProblem.make if case.is_head else measure.Problem.make
    return make(case, logit_std=logit_std)


def base_row(case: Case) -> dict:
    """The row of `case` before anything is measured, with the settings it is measured under."""
    kind = FLOOR if case.is_floor else implementation_of(case).smoothing_kind
    threads = torch.get_num_threads() if case.threads is None else case.threads
    return new_row(case, kind) | {
        "threads": threads,
        "machine": measure.machine_name(),
        "git_commit": _commit(),
    }


def failure(error: BaseException, context: str = "") -> dict:
    status = "oom" if is_out_of_memory(error) else "error"
    return {"status": status, "message": f"{context}{type(error).__name__}: {error}".splitlines()[0][:300]}


def memory_refusal(case: Case, held_bytes: int = 0) -> dict | None:
    """A skip when the case's estimated peak exceeds what its device has free (plus `held_bytes`,
    the inputs this process already holds for it)."""
    available = measure.available_bytes(case.device)
    needed = measure.estimated_peak_bytes(case)
    if available is None or needed <= available + held_bytes:
        return None
    return {
        "status": "skipped",
        "message": f"estimated peak {needed / 2**30:.2f} GiB exceeds the "
        f"{(available + held_bytes) / 2**30:.2f} GiB available on {case.device}",
    }


def collect_garbage() -> None:
    """Free what the last case left in reference cycles: a full collection, after which the survivors
    are frozen (`gc.freeze`), so that the next looks only at objects made since. A full collection
    over torch's and its compilers' objects costs about 0.4 s, which once per case was most of a
    small case's time. `run_sweep` unfreezes them when it ends (a child process just exits)."""
    gc.collect()
    gc.freeze()


def bandwidth_fields(row: dict, copy_bandwidth: float | None) -> dict:
    """A forward+backward row's least traffic per second (read the logits, write the gradient), and
    that as a fraction of the device's copy bandwidth; nothing for other passes."""
    if row["pass"] != "forward+backward" or not row["median_s"] or row.get("hidden"):
        return {}  # a head case's least traffic is not its logits': it never need hold them
    achieved = 2 * row["logits_bytes"] / row["median_s"]
    fraction = achieved / copy_bandwidth if copy_bandwidth else None
    return {"bandwidth_bytes_per_s": achieved, "bandwidth_fraction": fraction}


def measure_case(
    case: Case,
    problem: measure.Problem,
    loss_fn: LossFn | None = None,
    min_time: float = 0.5,
    copy_bandwidth: float | None = None,
) -> dict:
    """One row: gate, time and meter `case`. Never raises for a failing case; the row says what happened.

    The timed pass's first call comes before the gate, so that its time (first_call_s) includes any
    compilation; a case the gate rejects keeps no time at all. `copy_bandwidth`: the device's, for
    the row's bandwidth_fraction.
    """
    row = base_row(case)
    device = torch.device(case.device)
    impl = implementation_of(case)
    timed_pass = measure.HeadTimedPass if case.is_head else measure.TimedPass
    gate = measure.check_head_against_reference if case.is_head else measure.check_against_reference
    try:
        timed = timed_pass(case, problem, impl, loss_fn)
        first_call_s = measure.timed_call(timed)
        if impl is not None:
            row["max_rel_error"] = gate(case, problem, impl, loss_fn)
        with measure.OtherLoad(resolution=BUSY_LOAD / 2) as load:
            timing = measure.time_pass(timed, min_time=min_time, first_call_s=first_call_s)
        row.update(timing.row_fields())  # median, IQR, runs, threads, first call, timer, wall and host time
        row.update(bandwidth_fields(row, copy_bandwidth))
        if load.fraction is not None:  # else timed too briefly to tell: both stay empty
            row.update(other_load=load.fraction, busy=load.fraction > BUSY_LOAD)
        row["message"] = "; ".join(filter(None, [timing.warning, getattr(timed, "note", "")]))
        row["peak_bytes"] = measure.peak_bytes(timed, device)
        if device.type == "cpu":
            row["peak_rss_bytes"] = measure.peak_rss_bytes(timed)
    except measure.GateFailure as e:
        row["status"], row["message"] = "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a sweep records any failure and goes on
        row.update(failure(e))
    finally:
        timed = None
        collect_garbage()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _size(case: Case) -> tuple:
    """What one set of inputs serves: a size, its ignored targets and its class weights."""
    return (
        case.device,
        case.dtype,
        case.batch,
        case.classes,
        case.hidden,
        case.ignore_fraction,
        case.weighted,
    )


def measure_cases(
    cases: list[Case],
    logit_std: float,
    min_time: float,
    loss_fns: dict[str, LossFn],
    threads: int | None = None,
    copy_bandwidths: dict[str, float | None] | None = None,
    cuda_device: int | None = None,
) -> Iterator[dict]:
    """A row per case, in order, each set of inputs made once, each case at its thread count (torch's
    count is restored at the end). The one place cases are measured: in this process, or in an
    isolated child (hence `threads`, for cases that name none: a child starts with torch's default,
    `copy_bandwidths`, by device: the parent's measurement, so that every row of a run shares it, and
    `cuda_device`: the GPU "cuda" means, a sharded sweep's rank's own)."""
    copy_bandwidths = copy_bandwidths or {}
    own_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield from _measure_cases(cases, logit_std, min_time, loss_fns, copy_bandwidths, cuda_device)
    finally:
        torch.set_num_threads(own_threads)


def held_bytes(problem) -> int:
    """The bytes of a problem's floating inputs (what this process holds for its cases)."""
    if isinstance(problem, measure.HeadProblem):
        tensors = (problem.hidden, problem.lm_weight)
    else:
        tensors = (problem.logits,)
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure_cases(cases, logit_std, min_time, loss_fns, copy_bandwidths, cuda_device) -> Iterator[dict]:
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    default_threads = torch.get_num_threads()
    size, problem, problem_error = None, None, None
    for case in cases:
        torch.set_num_threads(default_threads if case.threads is None else case.threads)
        why_not = refusal(case)
        if why_not is None and _size(case) != size:
            size, problem, problem_error = _size(case), None, None
            collect_garbage()  # the previous inputs go before these are weighed and made
        held = 0 if problem is None else held_bytes(problem)
        why_not = why_not or memory_refusal(case, held)
        if why_not is None and problem is None and problem_error is None:
            try:
                problem = make_problem(case, logit_std)
            except Exception as e:  # noqa: BLE001
                problem_error = e
        if why_not is not None:
            row = base_row(case) | why_not
        elif problem is None:
            row = base_row(case) | failure(problem_error, "making inputs: ")
        else:
            loss_fn, copy_bandwidth = loss_fns.get(case.implementation), copy_bandwidths.get(case.device)
            row = measure_case(case, problem, loss_fn, min_time=min_time, copy_bandwidth=copy_bandwidth)
        yield row | {"min_time": min_time, "logit_std": logit_std}


def isolated_rows(cases: list[Case], logit_std: float, min_time: float, *args) -> Iterator[dict]:
    """`measure_cases` in a child process, and in a new one after each death, which costs the case
    being measured: its row says how the child died (oom on SIGKILL, else crashed). `args`: the rest
    of measure_cases' arguments."""
    left = list(cases)
    while left:
        try:
            for row in isolation.stream(measure_cases, list(left), logit_std, min_time, *args):
                left.pop(0)  # rows come in the order of the cases
                yield row
            return
        except isolation.ChildDied as died:
            if left:
                settings = {"min_time": min_time, "logit_std": logit_std}
                yield base_row(left.pop(0)) | died.outcome() | settings
