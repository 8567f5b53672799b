"""Results data: one tidy CSV per run (a row per case) and a JSON file describing the machine.

Schema of `results.csv` (validated by `read_rows`):

| column | type | meaning |
|---|---|---|
| implementation | str | registry name, or "floor" for `torch.exp(z, out=buf)` on the same logits |
| smoothing_kind | str | "exact", "sparse", or "floor" |
| device | str | device type: cpu, cuda, mps |
| dtype | str | logits dtype: float32, float64, float16, bfloat16 |
| batch, classes | int | N and C of the (N, C) logits |
| smoothing | float | label smoothing (the floor row carries the sweep's value, unused) |
| pass | str | forward, backward or forward+backward (the floor row: forward+backward, its reference) |
| median_s, iqr_s | float | median and interquartile range of one call, seconds (empty unless status is ok) |
| runs, threads | int | calls timed, and torch's intra-op thread count |
| peak_bytes | int | peak bytes allocated above those allocated before the pass (empty where not measurable) |
| peak_rss_bytes | int | the process's peak resident set during the pass (CPU on Linux only) |
| logits_bytes | int | N * C * itemsize, the size of the logits and of their gradient |
| max_rel_error | float | the correctness gate's largest relative error against float64 |
| status | str | ok, failed (gate), oom, error |
| message | str | why, when status is not ok; a warning on an ok row (e.g. a wide IQR) |
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from lsr.types import DEVICES, DTYPES, SMOOTHING_KINDS

# --- the benchmark's vocabulary: every other module of lsr.bench imports it from here ----------------

Pass = Literal["forward", "backward", "forward+backward"]
Status = Literal["ok", "failed", "oom", "error"]
PASSES: tuple[Pass, ...] = get_args(Pass)
STATUSES: tuple[Status, ...] = get_args(Status)
FLOOR = "floor"  # the implementation name (and smoothing kind) of torch.exp(z, out=buf) on the same logits
KINDS = (*SMOOTHING_KINDS, FLOOR)
CASE_KEY = ("implementation", "device", "dtype", "batch", "classes", "smoothing", "pass")
RESULTS_FILE, METADATA_FILE = "results.csv", "metadata.json"


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

    def key(self) -> tuple:
        return case_key(self.as_dict())

    @property
    def is_floor(self) -> bool:
        return self.implementation == FLOOR

    def as_dict(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        return row

    @classmethod
    def of_row(cls, row: dict) -> Case:
        return cls(*case_key(row))


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
        "status": "ok",
        "message": "",
    }


COLUMNS = {
    "implementation": str,
    "smoothing_kind": str,
    "device": str,
    "dtype": str,
    "batch": int,
    "classes": int,
    "smoothing": float,
    "pass": str,
    "median_s": float,
    "iqr_s": float,
    "runs": int,
    "threads": int,
    "peak_bytes": int,
    "peak_rss_bytes": int,
    "logits_bytes": int,
    "max_rel_error": float,
    "status": str,
    "message": str,
}
OPTIONAL = {
    "median_s",
    "iqr_s",
    "runs",
    "threads",
    "peak_bytes",
    "peak_rss_bytes",
    "max_rel_error",
    "message",
}


class SchemaError(ValueError):
    """A results file that does not follow the documented schema."""


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    atomic_write(path, buffer.getvalue())


def _convert(raw: str, kind: type, finite: bool):
    if kind is str:
        return raw
    value = float(raw)
    if kind is int:
        if not value.is_integer():
            raise ValueError(raw)
        return int(value)
    if finite and not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse(row: dict, line: int, path: Path) -> dict:
    parsed = {}
    for column, kind in COLUMNS.items():
        raw = row.get(column)
        if raw is None:
            raise SchemaError(f"{path}:{line}: missing column {column!r}")
        if raw == "":
            if column not in OPTIONAL:
                raise SchemaError(f"{path}:{line}: column {column!r} is empty")
            parsed[column] = None if kind is not str else ""
            continue
        try:
            parsed[column] = _convert(raw, kind, finite=column not in OPTIONAL)
        except (ValueError, OverflowError):
            raise SchemaError(
                f"{path}:{line}: column {column!r} should be {kind.__name__}, got {raw!r}"
            ) from None
    if parsed["status"] not in STATUSES:
        raise SchemaError(f"{path}:{line}: status {parsed['status']!r} is not one of {STATUSES}")
    if parsed["pass"] not in PASSES:
        raise SchemaError(f"{path}:{line}: pass {parsed['pass']!r} is not one of {PASSES}")
    for column, allowed in (("device", DEVICES), ("dtype", tuple(DTYPES)), ("smoothing_kind", KINDS)):
        if parsed[column] not in allowed:
            raise SchemaError(f"{path}:{line}: {column} {parsed[column]!r} is not one of {allowed}")
    if parsed["status"] == "ok" and not (
        parsed["median_s"] is not None and math.isfinite(parsed["median_s"])
    ):
        raise SchemaError(f"{path}:{line}: an ok row needs a finite median_s")
    return parsed


def read_rows(path: str | Path) -> list[dict]:
    """Read and validate a results.csv (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no results file at {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SchemaError(f"{path}: not a results file, missing columns {missing}")
        return [_parse(row, line, path) for line, row in enumerate(reader, start=2)]


def write_metadata(path: Path, metadata: dict) -> None:
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


def _benchmark_row(bench: dict) -> dict | None:
    """A results row from one pytest-benchmark entry; None for an entry that is not an lsr-bench case."""
    info, stats = bench.get("extra_info", {}), bench["stats"]
    if "case" not in info:
        return None
    return info["case"] | {
        "median_s": stats["median"],
        "iqr_s": stats["iqr"],
        "runs": stats["rounds"] * stats.get("iterations", 1),
        "threads": info.get("threads"),
        "peak_bytes": info.get("peak_bytes"),
        "status": "ok",
        "message": "",
    }


def _from_pytest_benchmark(path: Path) -> tuple[list[dict], dict]:
    """Rows and metadata from a `pytest --benchmark-json` file of the suite in benchmarks/pytest_suite."""
    try:
        data = json.loads(path.read_text())
        benchmarks, machine = data["benchmarks"], data.get("machine_info", {})
        rows = [row for row in map(_benchmark_row, benchmarks) if row is not None]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SchemaError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
    if not rows:
        raise SchemaError(f"{path}: no lsr-bench cases in this pytest-benchmark file")
    # The suite's conftest stores lsr.bench.environment's dictionary under machine_info["lsr"].
    metadata = machine.get("lsr") or {"device_name": machine.get("cpu", {}).get("brand_raw", "?")}
    return rows, metadata | {"source": "pytest-benchmark"}
