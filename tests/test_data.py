"""The data layer: the results schema (declared once, documented from its declaration), reading and
writing results files (atomic, durable, older schemas still read, malformed ones refused), and
loading a pytest-benchmark JSON file."""

import json
import os
import stat

import pytest

import lsr
from helpers import FAST, ROOT, run_pytest, small_sweep
from lsr.bench import data as results
from lsr.bench.cli import main as cli_main
from lsr.bench.data import (
    FLOOR,
    FLOOR_ALLOC,
    FLOORS,
    SCHEMA_VERSION,
    STATUSES,
    Case,
    SchemaError,
    floor_for,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)
from lsr.bench.sweep.grid import Grid
from lsr.bench.sweep.runner import run_sweep


def test_schema_rejects_malformed_files(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("implementation,device\nnative,cpu\n")
    with pytest.raises(SchemaError, match="missing columns"):
        read_rows(path)

    rows = run_sweep(
        Grid(["native"], ["cpu"], ["float32"], [4], [3], passes=["forward"]).cases(), tmp_path, **FAST
    )
    write_rows(path, [rows[1] | {"batch": "many"}])
    with pytest.raises(SchemaError, match=r"results.csv:2: column 'batch' should be int, got 'many'"):
        read_rows(path)
    write_rows(path, [rows[1] | {"status": "great"}])
    with pytest.raises(SchemaError, match="status 'great' is not one of"):
        read_rows(path)
    write_rows(path, [rows[1] | {"median_s": None}])
    with pytest.raises(SchemaError, match="an ok row needs a finite median_s"):
        read_rows(path)
    for column, bad in (("batch", "1.7"), ("batch", "inf"), ("device", "tpu"), ("dtype", "int8")):
        write_rows(path, [rows[1] | {column: bad}])
        with pytest.raises(SchemaError, match=column):
            read_rows(path)


def test_pytest_benchmark_json_is_read_by_plot(tmp_path):
    json_path = tmp_path / "run.json"
    result = run_pytest(
        "benchmarks/pytest_suite",
        "-k",
        "N512-C1000 and (native or floor) and not compiled",  # compiling is not what this tests
        "--benchmark-min-time=0.0005",
        "--benchmark-max-time=0.01",
        f"--benchmark-json={json_path}",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert cli_main(["plot", str(json_path), "--out", str(tmp_path / "charts")]) == 0
    assert (tmp_path / "charts" / "floor_multiple_float32.png").exists()


def test_results_files_honour_the_umask_and_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda *a: events.append(("replace",)) or real_replace(*a))
    old_umask = os.umask(0o027)
    try:
        write_rows(tmp_path / "results.csv", [])
        write_metadata(tmp_path / "metadata.json", {})
    finally:
        os.umask(old_umask)
    for name in ("results.csv", "metadata.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
    assert events == [("fsync", False), ("replace",), ("fsync", True)] * 2


def test_duplicate_rows_are_refused_naming_both_lines(tmp_path):
    rows = run_sweep(small_sweep()[:2], tmp_path, **FAST)
    write_rows(tmp_path / "results.csv", [rows[0], rows[1], rows[0]])
    with pytest.raises(SchemaError, match="lines 2 and 4 measure the same case"):
        read_rows(tmp_path)


def test_schema_version_is_recorded_and_older_files_still_read(tmp_path):
    # The first rows of the CPU sweep committed at aa4a784, written before schema versions existed.
    committed = read_rows(ROOT / "tests" / "data" / "results_schema1.csv")
    assert committed and all(r["schema_version"] == 1 for r in committed)
    assert all(r["min_time"] is None and r["busy"] is None for r in committed)
    assert all(r["ignore_fraction"] == 0.0 and r["weighted"] is False for r in committed)  # since 3
    assert all(r["first_call_s"] is None and r["bandwidth_fraction"] is None for r in committed)
    assert {Case.of_row(r).key() for r in committed} == {results.case_key(r) for r in committed}

    rows = run_sweep(small_sweep()[:1], tmp_path, grid={"batches": [4]}, **FAST)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "schema_version" in header and rows[0]["schema_version"] == SCHEMA_VERSION
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["schema_version"] == SCHEMA_VERSION and metadata["grid"] == {"batches": [4]}
    assert read_metadata(tmp_path)["settings"]["min_time"] == 0.001

    write_rows(tmp_path / "results.csv", rows)
    text = (tmp_path / "results.csv").read_text()
    (tmp_path / "results.csv").write_text(text.replace(f",{SCHEMA_VERSION}\n", f",{SCHEMA_VERSION + 1}\n"))
    with pytest.raises(SchemaError, match="schema version"):
        read_rows(tmp_path)


def test_schema_2_files_read_the_case_axes_of_schema_3_as_their_defaults_and_resume(tmp_path):
    rows = run_sweep(small_sweep()[:2], tmp_path, **FAST)
    since_3 = ("ignore_fraction", "weighted", "first_call_s", "bandwidth_bytes_per_s", "bandwidth_fraction")
    assert all(column in results.ADDED_LATER for column in since_3)
    columns = [c for c in results.COLUMN_TYPES if c not in since_3]
    lines = [",".join(columns)] + [
        ",".join("2" if c == "schema_version" else "" if r[c] is None else str(r[c]) for c in columns)
        for r in rows
    ]
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    old = read_rows(tmp_path)
    assert [r["schema_version"] for r in old] == [2, 2]
    assert all(
        r["ignore_fraction"] == 0.0 and r["weighted"] is False and r["first_call_s"] is None for r in old
    )
    assert (
        run_sweep(small_sweep()[:2], tmp_path, resume=True, **FAST) == old
    )  # the same cases: nothing measured again


def test_every_status_and_column_is_documented():
    assert set(STATUSES) == {
        "ok",
        "failed",
        "error",
        "oom",
        "crashed",
        "skipped",
        "unsupported",
        "not-available",
    }
    from lsr.bench.data import schema

    for status in STATUSES:
        assert f"| {status} |" in schema.__doc__
    for floor in results.FLOORS:
        assert f"| {floor} |" in schema.__doc__
    for column in results.COLUMNS:  # the table is made from the declaration: each with its type
        assert f"| {column.name} | {column.type.__name__} |" in schema.__doc__


def test_floor_for_names_an_implementations_floor():
    assert floor_for("fused-exact-inplace") == FLOOR and floor_for("native") == FLOOR_ALLOC
    assert floor_for(lsr.get("fused-exact-inplace")) == FLOOR and floor_for(lsr.get("dense")) == FLOOR_ALLOC
    assert [floor_for(name) for name in FLOORS] == list(FLOORS)
    assert floor_for("not-registered") == FLOOR_ALLOC
    for impl in lsr.REGISTRY.values():
        writes_logits = impl.inplace_backward or impl.gradient_in_forward
        assert floor_for(impl.name) == (FLOOR if writes_logits else FLOOR_ALLOC)


def test_an_interrupt_after_the_rename_is_not_turned_into_a_missing_file(tmp_path, monkeypatch):
    """Ctrl-C landing between the rename and the end of atomic_write must reach the caller as
    KeyboardInterrupt (exit 130), not as the clean-up's FileNotFoundError (exit 2, seen in CI)."""
    import os

    import lsr.bench.data.files as files

    real_replace = os.replace

    def interrupted_after_renaming(source, target):
        real_replace(source, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted_after_renaming)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "results.csv", "a,b\n")
    assert (tmp_path / "results.csv").read_text() == "a,b\n"
