"""The machine and software a measurement ran on: one dictionary, recorded with every run.

Used by the sweep runner (metadata.json), the pytest-benchmark hook (machine_info) and `lsr-train`.
Memory, CPU counts and load come from psutil; the CPU model and its vector ISA from /proc/cpuinfo
where there is one (psutil does not report them), because hosts of one kind differ by the ISA
(AVX-512 or AVX2 only), and a ratio measured on one is not comparable with the other's.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import sys
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
