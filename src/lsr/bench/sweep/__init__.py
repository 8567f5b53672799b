"""The sweep layer: what is benchmarked (`grid`: cases, grids, presets; `head_grid`: the LM head
losses' grid and presets), one case measured (`case`),
a sweep of them into a results folder with its guarantees (`runner`: one writer, rows kept as they
come, resume), in child processes (`isolate`) or shared by the ranks of a torchrun launch (`shard`).
It reads `lsr.bench.data` and `lsr.bench.measure`; nothing here draws or prints a report.

Re-exported here: what the command line, the suites and the tests call.
"""

from lsr.bench.sweep.case import measure_case, measure_cases
from lsr.bench.sweep.grid import (
    ALL_CORES,
    PRESETS,
    Grid,
    cases_of,
    implementation_of,
    present_devices,
    preset,
    preset_grids,
    refusal,
    registered,
    takes,
    thread_count,
    why_not,
)
from lsr.bench.sweep.head_grid import HEAD_PRESETS, HeadGrid, head_registered
from lsr.bench.sweep.runner import (
    BusyMachineWarning,
    ResumeRefused,
    SharedHostWarning,
    SweepInterrupted,
    SweepLocked,
    run_sweep,
)
from lsr.bench.sweep.shard import SHARED_DEVICES, Shard, share, size_of

__all__ = [
    "ALL_CORES",
    "HEAD_PRESETS",
    "PRESETS",
    "SHARED_DEVICES",
    "BusyMachineWarning",
    "Grid",
    "HeadGrid",
    "ResumeRefused",
    "Shard",
    "SharedHostWarning",
    "SweepInterrupted",
    "SweepLocked",
    "cases_of",
    "head_registered",
    "implementation_of",
    "measure_case",
    "measure_cases",
    "present_devices",
    "preset",
    "preset_grids",
    "refusal",
    "registered",
    "run_sweep",
    "share",
    "size_of",
    "takes",
    "thread_count",
    "why_not",
]
