"""The measuring layer: one case's inputs and timed pass (`problem`; a head case's, `head`), its
time (`timing`), its peak memory (`memory`), the correctness gate before any timing (`gate`; a head
case's in `head`), and the machine it ran on (`machine`). It reads the results vocabulary (`lsr.bench.data`) and the registry; nothing here knows
of sweeps, reports or the command line.

Re-exported here: what the sweep, the suites and the tests call.
"""

from lsr.bench.measure.gate import GATE_ROWS, GATE_TOLERANCE, GateFailure, check_against_reference
from lsr.bench.measure.head import (
    HEAD_GATE_TOKENS,
    HeadProblem,
    HeadTimedPass,
    check_head_against_reference,
    estimated_head_peak_bytes,
)
from lsr.bench.measure.machine import (
    OtherLoad,
    available_bytes,
    copy_bandwidth,
    copy_bandwidths,
    environment,
    git_commit,
    machine_name,
    vector_isa,
)
from lsr.bench.measure.memory import (
    cpu_peak_bytes,
    cuda_peak_bytes,
    estimated_peak_bytes,
    peak_bytes,
    peak_rss_bytes,
)
from lsr.bench.measure.problem import Problem, TimedPass, synchronize, writes_logits_per_call
from lsr.bench.measure.timing import (
    CUDA_EVENTS,
    L2_FLUSH,
    L2_FLUSH_VARIABLE,
    PERF_COUNTER,
    WIDE_IQR,
    L2Flush,
    Measurement,
    l2_cache_bytes,
    l2_flush_bytes,
    relative_iqr,
    time_pass,
    timed_call,
)

__all__ = [
    "CUDA_EVENTS",
    "GATE_ROWS",
    "GATE_TOLERANCE",
    "HEAD_GATE_TOKENS",
    "HeadProblem",
    "HeadTimedPass",
    "check_head_against_reference",
    "estimated_head_peak_bytes",
    "L2_FLUSH",
    "L2_FLUSH_VARIABLE",
    "PERF_COUNTER",
    "WIDE_IQR",
    "GateFailure",
    "L2Flush",
    "Measurement",
    "OtherLoad",
    "Problem",
    "TimedPass",
    "available_bytes",
    "check_against_reference",
    "cpu_peak_bytes",
    "cuda_peak_bytes",
    "copy_bandwidth",
    "copy_bandwidths",
    "environment",
    "estimated_peak_bytes",
    "git_commit",
    "l2_cache_bytes",
    "l2_flush_bytes",
    "machine_name",
    "peak_bytes",
    "peak_rss_bytes",
    "relative_iqr",
    "synchronize",
    "time_pass",
    "timed_call",
    "vector_isa",
    "writes_logits_per_call",
]
