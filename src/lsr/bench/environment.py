"""The machine and software a measurement ran on: one dictionary, recorded with every run.

Used by the sweep runner (metadata.json), the pytest-benchmark hook (machine_info) and `lsr-train`.
Memory, CPU counts and load come from psutil; the CPU model and its vector ISA from /proc/cpuinfo
where there is one (psutil does not report them), because hosts of one kind differ by the ISA
(AVX-512 or AVX2 only), and a ratio measured on one is not comparable with the other's.

Also the machine's state while a sweep runs: the memory a case may use (`available_bytes`) and the
CPU time other processes take while a case is timed (`OtherLoad`).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

import lsr

# Widest first: the first one a CPU has names its vector ISA.
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def vector_isa() -> str:
    """The widest vector instruction set the CPU reports, e.g. "avx512f" or "avx2" ("unknown" if none)."""
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    return next((isa for isa in VECTOR_ISAS if isa in flags), "unknown")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "mps":
        return "Apple MPS"
    return cpu_model()


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: str = "cpu", **extra) -> dict:
    """What a reader needs to judge a number: hardware, load, software, commit, date; plus `extra`."""
    load = psutil.getloadavg()[0] if hasattr(psutil, "getloadavg") else None
    return {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "vector_isa": vector_isa(),
        "cpu_count": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_1min": load,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "lsr_version": lsr.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else None,
    } | extra


def available_bytes(device: str) -> int | None:
    """Memory a new allocation on `device` can take now; None where it cannot be known (mps)."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return psutil.virtual_memory().available
    if device_type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return None


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle. Steal counts: a hypervisor that gives our
    CPUs to another machine slows a measurement as much as a local process does."""
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, name, 0.0) for name in fields)


def _own_cpu_seconds() -> float:
    t = psutil.Process().cpu_times()  # every thread of this process, torch's intra-op pool included
    return t.user + t.system


def _tick_seconds() -> float:
    try:
        return 1 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.01


class OtherLoad:
    """Measures, around a block, the CPU time other processes used as a fraction of the machine.

    fraction = (machine's busy CPU time - this process's) / (wall time x logical CPUs). The clocks
    behind both advance in ticks (10 ms), every CPU's apart, so the difference is known to about
    (CPUs + 2) ticks: `fraction` is None after a block too short to know it within `resolution`
    (about 0.4 s on 2 CPUs for the default).

        with OtherLoad() as load:
            work()
        load.fraction
    """

    def __init__(self, resolution: float = 0.05):
        self.resolution = resolution
        self.fraction: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        others = (_busy_cpu_seconds() - busy0) - (_own_cpu_seconds() - own0)
        cpus = psutil.cpu_count(logical=True) or 1
        capacity = (time.perf_counter() - wall0) * cpus
        if (cpus + 2) * _tick_seconds() <= self.resolution * capacity:
            self.fraction = min(1.0, max(0.0, others / capacity))
