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
| message | str | why, when status is not ok |
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path

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
STATUSES = ("ok", "failed", "oom", "error")
DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "float64", "float16", "bfloat16")
KINDS = ("exact", "sparse", "floor")
PASSES = ("forward", "backward", "forward+backward")
RESULTS_FILE, METADATA_FILE = "results.csv", "metadata.json"


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
    import io

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
    for column, allowed in (("device", DEVICES), ("dtype", DTYPES), ("smoothing_kind", KINDS)):
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
