"""Results data: one tidy CSV per run (a row per case) and a JSON file describing the machine.

Schema of `results.csv` (version 5, validated by `read_rows`):

| column | type | meaning |
|---|---|---|
| implementation | str | registry name, or one of the two floors below |
| smoothing_kind | str | "exact", "sparse", or "floor" (both floors) |
| device | str | device type: cpu, cuda, mps |
| dtype | str | logits dtype: float32, float64, float16, bfloat16 |
| batch, classes | int | N and C of the (N, C) logits |
| smoothing | float | label smoothing, 0 for plain cross-entropy (a floor row carries the sweep's first value, unused) |
| pass | str | forward, backward or forward+backward (a floor row: forward+backward, its reference) |
| ignore_fraction | float | the fraction of targets set to ignore_index (-100), as padding does; floors: 0 (since 3; older files read 0) |
| weighted | bool | class weights on: random positive weights, fixed seed; floors: False (since 3; older files read False) |
| median_s, iqr_s | float | median and interquartile range of one call, seconds (empty unless status is ok) |
| timer | str | what median_s was read from: "perf_counter" (the host clock around calls that synchronise the device) or "cuda-events" (CUDA events around each call on the device); older files read "perf_counter" (since 4) |
| wall_median_s | float | the median of one call by the host clock with the device synchronised, kept beside CUDA events as a cross-check; empty where it is median_s itself (perf_counter) (since 4) |
| host_s | float | median host time to enqueue one call, without waiting for the device: a case whose host_s is close to median_s is launch-bound (CUDA; empty on CPU, where calls run synchronously) (since 4) |
| first_call_s | float | the timed pass's first call, seconds, made before the gate: compilation, autotuning and warm-up included where this process meets them first (e.g. a compiled implementation's first case of a dtype); the median excludes it (since 3) |
| runs | int | calls timed |
| threads | int | torch's intra-op thread count the case ran with; part of the case key since 5 (a run may measure a case at 1 thread and at all cores) |
| min_time, logit_std | float | the run's timing budget per case (s) and the logits' standard deviation (since 2) |
| peak_bytes | int | peak bytes allocated above those allocated before the pass (empty where not measurable) |
| peak_rss_bytes | int | the process's peak resident set during the pass (CPU on Linux only) |
| logits_bytes | int | N * C * itemsize, the size of the logits and of their gradient |
| bandwidth_bytes_per_s | float | 2 * logits_bytes / median_s: the least traffic of a forward+backward (read the logits, write the gradient) per second; forward+backward rows (floors included) only (since 3) |
| bandwidth_fraction | float | bandwidth_bytes_per_s / the device's copy bandwidth, measured in the same run (metadata.json copy_bandwidth_bytes_per_s): 1 is a large copy's speed (since 3) |
| max_rel_error | float | the correctness gate's largest relative error against float64 |
| other_load | float | CPU time other processes used while the case was timed, as a fraction of the machine; empty when timed too briefly to tell (under about 0.4 s) (since 2) |
| busy | bool | other_load above BUSY_LOAD (0.10): the time may be inflated; the status stays ok (since 2) |
| status | str | one of the statuses below |
| message | str | why, when status is not ok; a warning on an ok row (e.g. a wide IQR) |
| machine | str | the machine's stable name, `lsr.bench.environment.machine_name()` (e.g. "epyc-2c-avx2"): merged results from several machines are told apart by it; older files read "" (since 4) |
| schema_version | int | the version of this schema the file was written with (since 2; a file without it is 1) |

The two floors, measured once per (device, dtype, batch, classes), forward+backward, on the same logits:

| floor | what | the reference of |
|---|---|---|
| floor | `torch.exp(z, out=buf)` into one buffer kept across calls | in-place implementations (`inplace_backward`): they write no new tensor either |
| floor-alloc | `torch.exp(z)` into a new tensor every call: allocation and first touch of fresh pages included | every other implementation: it allocates its gradient |

`floor_for(implementation)` names an implementation's floor.

Statuses:

| status | meaning |
|---|---|
| ok | gated, timed and metered |
| failed | the correctness gate rejected it: never timed |
| error | an exception other than running out of memory |
| oom | out of memory: an allocator's error, or the isolated child killed by SIGKILL (the OOM killer) |
| crashed | the isolated child died otherwise (the message names the signal or exit code) |
| skipped | its estimated peak memory exceeds what the device has available (the message says both) |
| unsupported | the implementation does not take this case (too few classes, backward of an in-place one) |
| not-available | the device is not on this machine, or the implementation cannot run on it here (e.g. no Triton) |

A file written before a column existed reads with that column's default (`ADDED_LATER`); a file
with a later schema_version than this module's is refused. Two rows with one case key are refused,
unless they name two machines (a file merged by `lsr-bench merge`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from lsr.bench.files import atomic_write as atomic_write  # re-exported: the summary writes with it
from lsr.types import DEVICES, DTYPES, SMOOTHING_KINDS

# --- the benchmark's vocabulary: every other module of lsr.bench imports it from here ----------------

Pass = Literal["forward", "backward", "forward+backward"]
Status = Literal["ok", "failed", "error", "oom", "crashed", "skipped", "unsupported", "not-available"]
PASSES: tuple[Pass, ...] = get_args(Pass)
STATUSES: tuple[Status, ...] = get_args(Status)
FLOOR = "floor"  # the implementation name (and smoothing kind) of torch.exp(z, out=buf) on the same logits
FLOOR_ALLOC = "floor-alloc"  # torch.exp(z) into a new tensor each call; its smoothing kind is FLOOR too
FLOORS = (FLOOR, FLOOR_ALLOC)
KINDS = (*SMOOTHING_KINDS, FLOOR)
CASE_KEY = (
    "implementation",
    "device",
    "dtype",
    "batch",
    "classes",
    "smoothing",
    "pass",
    "ignore_fraction",
    "weighted",
    "threads",
)
IGNORE_INDEX = -100  # the target value of an ignored row (F.cross_entropy's default)
RESULTS_FILE, METADATA_FILE = "results.csv", "metadata.json"
SCHEMA_VERSION = 5  # of results.csv and metadata.json; raise it with every column or status added
# Other processes using more than this fraction of the machine's CPU time during a case make it busy.
BUSY_LOAD = 0.10


@dataclass(frozen=True)
class Case:
    """One measurement: an implementation (or the floor) on one problem size, for one pass."""

    implementation: str
    device: str
    dtype: str
    batch: int
    classes: int
    smoothing: float
    pass_: Pass
    ignore_fraction: float = 0.0  # of the targets, set to IGNORE_INDEX
    weighted: bool = False  # class weights on
    threads: int | None = None  # torch's intra-op threads; None: whatever torch has when it runs

    def key(self) -> tuple:
        return case_key(self.as_dict())

    @property
    def is_floor(self) -> bool:
        return self.implementation in FLOORS

    def as_dict(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        return row

    @classmethod
    def of_row(cls, row: dict) -> Case:
        return cls(*case_key(row))


def floor_for(implementation) -> str:
    """The floor an implementation (a registry entry or its name) is a multiple of: FLOOR for one that
    writes its gradient into the logits (`inplace_backward` or `gradient_in_forward`), FLOOR_ALLOC for every other, and for a
    name the registry does not know. A floor's floor is itself.

    Example:
        >>> floor_for("fused-exact-inplace"), floor_for("native"), floor_for(FLOOR), floor_for("unknown")
        ('floor', 'floor-alloc', 'floor', 'floor-alloc')
    """
    from lsr.registry import REGISTRY  # lsr.bench.results is read by tools that need no loss

    name = implementation if isinstance(implementation, str) else implementation.name
    if name in FLOORS:
        return name
    impl = REGISTRY.get(name) if isinstance(implementation, str) else implementation
    writes_logits = impl is not None and (impl.inplace_backward or impl.gradient_in_forward)
    return FLOOR if writes_logits else FLOOR_ALLOC


def case_key(row: dict) -> tuple:
    """What identifies a case in a results row: two rows with one key measured the same thing."""
    return tuple(row[column] for column in CASE_KEY)


def new_row(case: Case, smoothing_kind: str) -> dict:
    """A results row for `case` before anything is measured: every column, status ok until told otherwise."""
    logits_bytes = case.batch * case.classes * DTYPES[case.dtype].itemsize
    row = dict.fromkeys(COLUMNS) | case.as_dict()
    return row | {
        "smoothing_kind": smoothing_kind,
        "logits_bytes": logits_bytes,
        "timer": "perf_counter",
        "status": "ok",
        "message": "",
        "machine": "",
        "schema_version": SCHEMA_VERSION,
    }


def busy_rows(rows: list[dict]) -> list[dict]:
    """The rows timed while other processes used more than BUSY_LOAD of the machine."""
    return [row for row in rows if row.get("busy")]


COLUMNS = {
    "implementation": str,
    "smoothing_kind": str,
    "device": str,
    "dtype": str,
    "batch": int,
    "classes": int,
    "smoothing": float,
    "pass": str,
    "ignore_fraction": float,
    "weighted": bool,
    "median_s": float,
    "iqr_s": float,
    "timer": str,
    "wall_median_s": float,
    "host_s": float,
    "first_call_s": float,
    "runs": int,
    "threads": int,
    "min_time": float,
    "logit_std": float,
    "peak_bytes": int,
    "peak_rss_bytes": int,
    "logits_bytes": int,
    "bandwidth_bytes_per_s": float,
    "bandwidth_fraction": float,
    "max_rel_error": float,
    "other_load": float,
    "busy": bool,
    "status": str,
    "message": str,
    "machine": str,
    "schema_version": int,
}
OPTIONAL = {
    "median_s",
    "timer",
    "wall_median_s",
    "host_s",
    "machine",
    "iqr_s",
    "first_call_s",
    "runs",
    "threads",
    "peak_bytes",
    "peak_rss_bytes",
    "max_rel_error",
    "bandwidth_bytes_per_s",
    "bandwidth_fraction",
    "min_time",
    "logit_std",
    "other_load",
    "busy",
    "message",
}
# Case columns added after version 1, and what a case written without them is.
CASE_DEFAULTS = {"ignore_fraction": 0.0, "weighted": False}
# Columns added after version 1, and what a row of a file written without them reads as.
ADDED_LATER = {
    "min_time": None,
    "logit_std": None,
    "other_load": None,
    "busy": None,
    "schema_version": 1,
    **CASE_DEFAULTS,
    "first_call_s": None,
    "bandwidth_bytes_per_s": None,
    "bandwidth_fraction": None,
    "timer": "perf_counter",
    "wall_median_s": None,
    "host_s": None,
    "machine": "",
}
BOOLEANS = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}


class SchemaError(ValueError):
    """A results file that does not follow the documented schema."""


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write `rows` in this version of the schema (rows read from an older file included)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        row = row | {"schema_version": SCHEMA_VERSION}
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    atomic_write(path, buffer.getvalue())


def _convert(raw: str, kind: type, finite: bool):
    if kind is str:
        return raw
    if kind is bool:
        return BOOLEANS[raw]  # KeyError: reported as a wrong type
    value = float(raw)
    if kind is int:
        if not value.is_integer():
            raise ValueError(raw)
        return int(value)
    if finite and not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse(row: dict, line: int, path: Path, defaults: dict) -> dict:
    parsed = {}
    for column, kind in COLUMNS.items():
        raw = row.get(column)
        if column in defaults:
            parsed[column] = defaults[column]
            continue
        if raw is None:
            raise SchemaError(f"{path}:{line}: missing column {column!r}")
        if raw == "":
            if column not in OPTIONAL:
                raise SchemaError(f"{path}:{line}: column {column!r} is empty")
            parsed[column] = None if kind is not str else ""
            continue
        try:
            parsed[column] = _convert(raw, kind, finite=column not in OPTIONAL)
        except (ValueError, OverflowError, KeyError):
            raise SchemaError(
                f"{path}:{line}: column {column!r} should be {kind.__name__}, got {raw!r}"
            ) from None
    if parsed["schema_version"] > SCHEMA_VERSION:
        raise SchemaError(
            f"{path}:{line}: written with schema version {parsed['schema_version']}; "
            f"this lsr-bench reads up to {SCHEMA_VERSION}: update it"
        )
    if parsed["status"] not in STATUSES:
        raise SchemaError(f"{path}:{line}: status {parsed['status']!r} is not one of {STATUSES}")
    if parsed["pass"] not in PASSES:
        raise SchemaError(f"{path}:{line}: pass {parsed['pass']!r} is not one of {PASSES}")
    for column, allowed in (("device", DEVICES), ("dtype", tuple(DTYPES)), ("smoothing_kind", KINDS)):
        if parsed[column] not in allowed:
            raise SchemaError(f"{path}:{line}: {column} {parsed[column]!r} is not one of {allowed}")
    if not 0.0 <= parsed["ignore_fraction"] < 1.0:
        raise SchemaError(f"{path}:{line}: ignore_fraction {parsed['ignore_fraction']} is not in [0, 1)")
    if parsed["status"] == "ok" and not (
        parsed["median_s"] is not None and math.isfinite(parsed["median_s"])
    ):
        raise SchemaError(f"{path}:{line}: an ok row needs a finite median_s")
    return parsed


def _refuse_duplicates(rows: list[tuple[int, dict]], path: Path) -> None:
    """Two rows of one case on one machine would make every chart and comparison pick one silently.
    Two machines may each have a row of a case: a merged file's (`lsr.bench.merge`)."""
    first_line: dict[tuple, int] = {}
    for line, row in rows:
        earlier = first_line.setdefault((row["machine"], *case_key(row)), line)
        if earlier != line:
            on = f" on {row['machine']}" if row["machine"] else ""
            raise SchemaError(f"{path}: lines {earlier} and {line} measure the same case {case_key(row)}{on}")


def read_rows(path: str | Path) -> list[dict]:
    """Read and validate a results.csv (or a directory holding one), of this schema or an older one."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c not in ADDED_LATER]
        if missing:
            raise SchemaError(f"{path}: not a results file, missing columns {missing}")
        # A file older than a column reads its default: the row then has every column of this schema.
        defaults = {c: ADDED_LATER[c] for c in ADDED_LATER if c not in reader.fieldnames}
        rows = [(line, _parse(row, line, path, defaults)) for line, row in enumerate(reader, start=2)]
    _refuse_duplicates(rows, path)
    return [row for _, row in rows]


def write_metadata(path: Path, metadata: dict) -> None:
    metadata = metadata | {"schema_version": SCHEMA_VERSION}
    atomic_write(path, json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() or path.name == RESULTS_FILE:
        path = (path if path.is_dir() else path.parent) / METADATA_FILE
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise SchemaError(f"{path}: expected a JSON object")
    return metadata


# --- loading a run: what the charts and the summary read ------------------------------------------


def load(path: str | Path) -> tuple[list[dict], dict]:
    """Rows and metadata from a results directory, a results.csv, or a pytest-benchmark JSON file."""
    path = Path(path)
    if path.suffix == ".json":
        return _from_pytest_benchmark(path)
    return read_rows(path), read_metadata(path)


def _benchmark_row(bench: dict, threads: int | None = None) -> dict | None:
    """A results row from one pytest-benchmark entry; None for an entry that is not an lsr-bench case.
    `threads`: the run's torch thread count, for entries that did not record their own."""
    info, stats = bench.get("extra_info", {}), bench["stats"]
    if "case" not in info:
        return None
    return (
        dict.fromkeys(COLUMNS)
        | CASE_DEFAULTS
        | info["case"]
        | {
            "median_s": stats["median"],
            "iqr_s": stats["iqr"],
            "runs": stats["rounds"] * stats.get("iterations", 1),
            "threads": info.get("threads", threads),
            "peak_bytes": info.get("peak_bytes"),
            "status": "ok",
            "message": "",
        }
    )


def _from_pytest_benchmark(path: Path) -> tuple[list[dict], dict]:
    """Rows and metadata from a `pytest --benchmark-json` file of the suite in benchmarks/pytest_suite."""
    try:
        data = json.loads(path.read_text())
        benchmarks, machine = data["benchmarks"], data.get("machine_info", {})
        # The suite's conftest: machine and software in machine_info["lsr"], per-run fields in "lsr_run".
        metadata = _pytest_benchmark_machine(machine) | (data.get("lsr_run") or {})
        rows = [row for bench in benchmarks if (row := _benchmark_row(bench, metadata.get("threads")))]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SchemaError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
    if not rows:
        raise SchemaError(f"{path}: no lsr-bench cases in this pytest-benchmark file")
    return rows, metadata | {"source": "pytest-benchmark"}


# What the suite's conftest wrote at the top of machine_info before it stored lsr.bench.environment's
# dictionary under machine_info["lsr"] (runs saved with --benchmark-save before then): our names.
_PYTEST_BENCHMARK_MACHINE_KEYS = {
    "torch_threads": "threads",
    "torch_version": "torch_version",
    "cuda_version": "cuda_version",
    "lsr_device_name": "device_name",
}


def _pytest_benchmark_machine(machine: dict) -> dict:
    """Run metadata from a pytest-benchmark file's machine_info: the conftest's "lsr" dictionary,
    completed from the older top-level keys (torch_threads and the rest) and the CPU's brand.

    >>> _pytest_benchmark_machine({"torch_threads": 2, "torch_version": "2.13.0", "cpu": {"brand_raw": "EPYC"}})
    {'device_name': 'EPYC', 'threads': 2, 'torch_version': '2.13.0'}
    """
    metadata = {"device_name": machine.get("cpu", {}).get("brand_raw", "?")}
    for key, ours in _PYTEST_BENCHMARK_MACHINE_KEYS.items():
        if machine.get(key) is not None:
            metadata[ours] = machine[key]
    return metadata | (machine.get("lsr") or {})
