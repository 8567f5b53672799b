"""pytest-benchmark suite over the asv suite's profile (benchmarks/asv_suite/profiles.py): every case
the registry's implementations take there, with the floors, and every LM head loss (`test_head`) with
floor-gemm, a case a head loss cannot take skipped with its reason; peak memory in extra_info.

    pytest benchmarks/pytest_suite --benchmark-json=run.json     # then: lsr-bench plot run.json
    LSR_ASV_PROFILE=full pytest benchmarks/pytest_suite ...      # the larger grid
    pytest benchmarks/pytest_suite --benchmark-save=NAME         # .benchmarks/<machine>/NNNN_NAME.json
    pytest benchmarks/pytest_suite --benchmark-compare=0001      # against saved run 0001

Cases, inputs, passes, the correctness gate and the memory meter come from `lsr.bench`; each timed
call synchronises the device before returning. The JSON's extra_info carries the case as a results
row, so `lsr-bench plot` reads it like a results.csv.
"""

import sys
from pathlib import Path

import pytest
import torch

import lsr
from lsr.bench import measure, sweep
from lsr.bench.data import new_row
from lsr.bench.sweep import grid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asv_suite.profiles import (  # noqa: E402 - the one definition of both suites' sizes
    HEAD_IMPLEMENTATIONS,
    HEAD_SMOOTHINGS,
    head_profile,
    profile,
)

_PROFILE = profile()
CASES = list(
    grid.Grid(
        grid.registered(),
        grid.present_devices(),
        ["float32"],
        _PROFILE["batches"],
        _PROFILE["classes"],
        passes=_PROFILE["passes"],
    ).cases()
)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.implementation}-{c.pass_}-{c.device}-{c.dtype}-N{c.batch}-C{c.classes}"
)
def test_loss(benchmark, case):
    problem = measure.Problem.make(case)
    impl = None if case.is_floor else lsr.get(case.implementation)
    if impl is not None:
        measure.check_against_reference(case, problem, impl)  # never time a wrong answer
    timed = measure.TimedPass(case, problem, impl)
    benchmark.extra_info["case"] = new_row(case, "floor" if impl is None else impl.smoothing_kind)
    benchmark.extra_info["peak_bytes"] = measure.peak_bytes(timed, timed.device)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if timed.prepares:  # its calls write into their logits: fresh ones before each, untimed
        benchmark.pedantic(timed, setup=timed.prepare, rounds=20, warmup_rounds=2)
    else:
        benchmark(timed)


_HEAD_PROFILE = head_profile()
HEAD_CASES = list(
    sweep.HeadGrid(
        list(HEAD_IMPLEMENTATIONS),
        grid.present_devices(),
        ["float32"],
        _HEAD_PROFILE["tokens"],
        _HEAD_PROFILE["hidden"],
        _HEAD_PROFILE["vocab"],
        smoothings=HEAD_SMOOTHINGS,
    ).cases()
)


@pytest.mark.parametrize(
    "case",
    HEAD_CASES,
    ids=lambda c: (
        f"{c.implementation}-s{c.smoothing:g}-{c.device}-{c.dtype}-N{c.batch}-H{c.hidden}-V{c.classes}"
    ),
)
def test_head(benchmark, case):
    refusal = sweep.refusal(case)
    if refusal is not None:
        pytest.skip(f"{refusal['status']}: {refusal['message']}")
    problem = measure.HeadProblem.make(case)
    impl = sweep.implementation_of(case)
    if impl is not None:
        measure.check_head_against_reference(case, problem, impl)  # never time a wrong answer
    timed = measure.HeadTimedPass(case, problem, impl)
    benchmark.extra_info["case"] = new_row(case, "floor" if impl is None else impl.smoothing_kind)
    benchmark.extra_info["peak_bytes"] = measure.peak_bytes(timed, timed.device)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(timed)
