"""pytest-benchmark suite over lsr.bench.grid.SUITE: every case of the grid, peak memory in extra_info.

    pytest benchmarks/pytest_suite --benchmark-json=run.json     # then: lsr-bench plot run.json

Cases, inputs, passes, the correctness gate and the memory meter come from `lsr.bench`; each timed
call synchronises the device before returning. The JSON's extra_info carries the case, so
`lsr-bench plot` reads it like a results.csv.
"""

import pytest
import torch

from lsr.bench import measure
from lsr.bench.grid import SUITE
from lsr.bench.runner import base_row

CASES = list(SUITE.cases())


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.implementation}-{c.pass_}-{c.device}-{c.dtype}-N{c.batch}-C{c.classes}"
)
def test_loss(benchmark, case):
    problem = measure.Problem.make(case)
    if not case.is_floor:
        measure.check_against_reference(case, problem)  # never time a wrong answer
    timed = measure.Pass(case, problem)
    benchmark.extra_info["case"] = base_row(case)
    benchmark.extra_info["peak_bytes"] = measure.peak_bytes(timed, timed.device)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(timed)
