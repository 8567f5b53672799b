"""The machine and software a measurement ran on: one dictionary, recorded with every run.

Used by the sweep runner (metadata.json), the pytest-benchmark hook (machine_info) and `lsr-train`.
Memory, CPU counts and load come from psutil; the CPU model and its vector ISA from /proc/cpuinfo
where there is one (psutil does not report them), because hosts of one kind differ by the ISA
(AVX-512 or AVX2 only), and a ratio measured on one is not comparable with the other's. The facts
that decide a CPU's ratios besides: its cache sizes (`cache_bytes`: whether a row of logits, or a
block of rows, stays in L2) and the copy bandwidth of each device (`copy_bandwidth`: what a
forward+backward that reads the logits once and writes the gradient once could reach). On CUDA
also the GPU's facts and how it is timed (`cuda_facts`: L2 size, the L2 flush policy, the driver),
and for every device the clock its times are read from (`timers`).

Also the machine's state while a sweep runs: the memory a case may use (`available_bytes`) and the
CPU time other processes take while a case is timed (`OtherLoad`).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

import lsr
from lsr.bench.data.schema import machine_name_of
from lsr.bench.measure.problem import synchronize
from lsr.bench.measure.timing import CUDA_EVENTS, L2_FLUSH, PERF_COUNTER, l2_flush_bytes, time_pass

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


def machine_name() -> str:
    """A stable name for this kind of machine: CPU family, logical cores and vector ISA, e.g.
    "epyc-2c-avx2". Hosts of one kind that differ by ISA differ by about 2.5x in floor ratios, so
    the ISA is part of the name: results from two ISAs never share a history line or a merge tag.

    Example:
        >>> import re
        >>> bool(re.fullmatch(r"[a-z0-9]+-[0-9]+c-[a-z0-9_]+", machine_name()))
        True
    """
    return machine_name_of(cpu_model(), psutil.cpu_count(logical=True), vector_isa())


CACHE_LEVELS = ("L1d", "L2", "L3")
SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _size_bytes(text: str) -> int | None:
    """Bytes of a cache size as sysfs or lscpu write it: "32K", "32768K", "1M", "32 KiB", "524288"."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    return int(match[1]) * _UNITS[match[2].upper()] if match else None


def _sysfs_caches(root: Path) -> dict[str, int | None]:
    """From root/index*/{level,type,size} (Linux sysfs, one CPU's view of its caches)."""
    found: dict[str, int | None] = {}
    for index in sorted(root.glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            found.setdefault("L1d" if level == "1" else f"L{level}", _size_bytes(size))
    return found


def _lscpu_caches() -> dict[str, int | None]:
    """From `lscpu -B -C=NAME,ONE-SIZE` (util-linux 2.34 on): one instance's size per cache."""
    try:
        out = subprocess.run(
            ["lscpu", "-B", "-C=NAME,ONE-SIZE"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split() for line in out.splitlines()[1:])
    return {fields[0]: _size_bytes(fields[1]) for fields in pairs if len(fields) == 2}


def _sysctl_caches() -> dict[str, int | None]:
    """From sysctl hw.l1dcachesize, hw.l2cachesize, hw.l3cachesize (macOS, the BSDs)."""
    found: dict[str, int | None] = {}
    for name, key in zip(CACHE_LEVELS, ("hw.l1dcachesize", "hw.l2cachesize", "hw.l3cachesize"), strict=True):
        try:
            out = subprocess.run(
                ["sysctl", "-n", key], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            continue
        found[name] = _size_bytes(out.stdout)
    return found


def cache_bytes(root: Path = SYSFS_CACHES) -> dict[str, int | None]:
    """The CPU's L1 data, L2 and L3 cache sizes in bytes, as one core sees them (an L3 shared by a
    group of cores counts whole): sysfs under `root` on Linux, else lscpu, else sysctl; None for a
    level the machine has not, or does not say."""
    for source in (lambda: _sysfs_caches(root), _lscpu_caches, _sysctl_caches):
        found = source()
        if any(found.get(level) for level in CACHE_LEVELS):
            return {level: found.get(level) or None for level in CACHE_LEVELS}
    return dict.fromkeys(CACHE_LEVELS)


COPY_BYTES = 256 * 2**20  # each of source and destination: far beyond any cache


def copy_bandwidth(device: str, nbytes: int = COPY_BYTES) -> float:
    """Bytes per second `dst.copy_(src)` moves on `device` (read and write both counted) at torch's
    current thread count, timed as a case is (`time_pass`), its fastest sample: the speed a pass that
    reads the logits once and writes a gradient once could reach. Tensors of `nbytes` each, or what
    fits in a quarter of the memory available; measured once per process, device and thread count
    (the CLI's run is one process).
    """
    return _copy_bandwidth(torch.device(device).type, torch.get_num_threads(), nbytes)


@functools.cache
def _copy_bandwidth(device: str, threads: int, nbytes: int) -> float:
    available = available_bytes(device)
    nbytes = nbytes if available is None else max(2**20, min(nbytes, available // 4))
    src = torch.ones(nbytes // 4, device=device)  # written: its pages are touched
    dst = torch.empty_like(src)
    target = torch.device(device)

    def copy() -> None:
        dst.copy_(src)
        synchronize(target)

    timing = time_pass(copy, min_time=0.2, min_samples=5)
    return 2 * src.numel() * src.element_size() / min(timing.samples)  # load only ever slows a copy


def copy_bandwidths(devices) -> dict[str, float | None]:
    """`copy_bandwidth` of each device type named (None for one that is not here or fails)."""
    measured: dict[str, float | None] = {}
    for device in devices:
        try:
            measured[device] = copy_bandwidth(device)
        except (RuntimeError, AssertionError, MemoryError):  # absent, or out of memory
            measured[device] = None
    return measured


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "mps":
        return "Apple MPS"
    return cpu_model()


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None where it cannot be run)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def cuda_facts() -> dict:
    """What decides a CUDA number besides the code: the GPU, its memory, L2 and SM count, the driver,
    and how the sweep times it (CUDA events; the L2 policy: flushed before each call or not, and the
    flush buffer's size)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", None) or None
    flush = L2_FLUSH.get("cuda", False)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_cache_bytes": l2,
        "l2_flush": flush,
        "l2_flush_bytes": l2_flush_bytes("cuda") if flush else None,
        "timer": CUDA_EVENTS,
        "driver_version": _nvidia_driver(),
        "cuda_runtime": torch.version.cuda,
    }


def timers(devices: list[str]) -> dict[str, str]:
    """The clock each device's times are read from (the results' timer column)."""
    return {d: CUDA_EVENTS if torch.device(d).type == "cuda" else PERF_COUNTER for d in devices}


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
    """What a reader needs to judge a number: hardware, load, software, commit, date; plus `extra`.

    `device` names a device type, or several joined by commas; copy_bandwidth_bytes_per_s has a
    value for each (bytes per second, read and write counted).
    """
    load = psutil.getloadavg()[0] if hasattr(psutil, "getloadavg") else None
    devices = device.split(",")
    cuda = {"cuda": cuda_facts()} if "cuda" in devices and torch.cuda.is_available() else {}
    return {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "vector_isa": vector_isa(),
        "machine": machine_name(),
        "cache_bytes": cache_bytes(),
        "copy_bandwidth_bytes_per_s": copy_bandwidths(devices),
        "timer": timers(devices),
        **cuda,
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
