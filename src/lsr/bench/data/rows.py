"""Reading and writing results: results.csv validated against the schema (`lsr.bench.data.schema`),
metadata.json, and a run loaded for the charts and tables (a results folder, a results.csv, or a
pytest-benchmark JSON file of the suite in benchmarks/pytest_suite)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from lsr.bench.data.files import atomic_write
from lsr.bench.data.schema import (
    COLUMN_TYPES,
    COLUMNS,
    KINDS,
    METADATA_FILE,
    PARTS_DIR,
    PASSES,
    RESULTS_FILE,
    SCHEMA_VERSION,
    STATUSES,
    case_key,
)
from lsr.types import DEVICES, DTYPES

OPTIONAL = frozenset(c.name for c in COLUMNS if c.optional)  # columns a row may leave empty
# Columns added after version 1, and what a row of a file written without them reads as
ADDED_LATER = {c.name: c.before for c in COLUMNS if c.since > 1}
# Where present, times that must be above 0 (median_s: on every ok row) and counts that cannot be negative
POSITIVE_TIMES = ("wall_median_s", "host_s", "first_call_s")
NON_NEGATIVE = (
    "runs",
    "threads",
    "peak_bytes",
    "peak_rss_bytes",
    "logits_bytes",
    "batch",
    "classes",
    "iqr_s",
)
# Case columns added after version 1, and what a case written without them is
CASE_DEFAULTS = {c.name: c.before for c in COLUMNS if c.key and c.since > 1}

BOOLEANS = {"True": True, "true": True, "1": True, "False": False, "false": False, "0": False}


class SchemaError(ValueError):
    """A results file that does not follow the documented schema."""


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write `rows` in this version of the schema (rows read from an older file included)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMN_TYPES), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        row = row | {"schema_version": SCHEMA_VERSION}
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMN_TYPES})
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
    for column, kind in COLUMN_TYPES.items():
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
        parsed["median_s"] is not None and math.isfinite(parsed["median_s"]) and parsed["median_s"] > 0
    ):
        raise SchemaError(
            f"{path}:{line}: an ok row needs a finite median_s above 0, got {parsed['median_s']}"
        )
    for column in POSITIVE_TIMES:  # a time of 0 or less is no measurement: ratios would divide by it
        if parsed[column] is not None and not parsed[column] > 0:
            raise SchemaError(f"{path}:{line}: column {column!r} must be above 0, got {parsed[column]}")
    for column in NON_NEGATIVE:
        if parsed[column] is not None and parsed[column] < 0:
            raise SchemaError(f"{path}:{line}: column {column!r} must be at least 0, got {parsed[column]}")
    return parsed


def _refuse_duplicates(rows: list[tuple[int, dict]], path: Path) -> None:
    """Two rows of one case on one machine would make every chart and comparison pick one silently.
    Two machines may each have a row of a case: a merged file's (`lsr.bench.data.merge`)."""
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
        missing = [c for c in COLUMN_TYPES if c not in (reader.fieldnames or []) and c not in ADDED_LATER]
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
    """Rows and metadata from a results directory, a results.csv, or a pytest-benchmark JSON file:
    what merge, plot, compare and the summary read. Refused (SchemaError) where a folder still holds
    the parts of an interrupted sharded sweep, whose rows results.csv lacks, or holds no row at all:
    a reader never goes on as if an empty run were the run."""
    path = Path(path)
    if path.suffix == ".json":
        return _from_pytest_benchmark(path)
    folder = path if path.is_dir() else path.parent
    parts = sorted((folder / PARTS_DIR).glob("rank-*.csv"))
    if parts:
        raise SchemaError(
            f"{folder} holds {len(parts)} part files of an interrupted sharded sweep ({folder / PARTS_DIR}) "
            "whose rows results.csv lacks: rerun the same lsr-bench run with --resume to fold them in first"
        )
    rows = read_rows(path)
    if not rows:
        raise SchemaError(f"{path}: no rows: nothing was measured into it")
    return rows, read_metadata(path)


def _benchmark_row(bench: dict, threads: int | None = None) -> dict | None:
    """A results row from one pytest-benchmark entry; None for an entry that is not an lsr-bench case.
    `threads`: the run's torch thread count, for entries that did not record their own."""
    info, stats = bench.get("extra_info", {}), bench["stats"]
    if "case" not in info:
        return None
    return (
        dict.fromkeys(COLUMN_TYPES)
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


# What the suite's conftest wrote at the top of machine_info before it stored lsr.bench.measure.machine's
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
