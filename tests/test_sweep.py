"""The sweep's guarantees: one writer, resume that loses nothing and mixes nothing, memory failures
recorded (in child processes too), interruption, durable results files, busy-machine rows."""

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import lsr
from lsr.bench import data as results
from lsr.bench.data import (
    FLOOR,
    SCHEMA_VERSION,
    STATUSES,
    Case,
    SchemaError,
    busy_rows,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)
from lsr.bench.report.compare import compare, format_comparison
from lsr.bench.sweep.runner import (
    LOCK_FILE,
    BusyMachineWarning,
    ResumeRefused,
    SweepInterrupted,
    SweepLocked,
    run_sweep,
)

FAST = dict(min_time=0.001, progress=False)
ROOT = Path(__file__).resolve().parents[1]


def case(implementation: str, pass_: str = "forward", batch: int = 4, classes: int = 3) -> Case:
    return Case(implementation, "cpu", "float32", batch, classes, 0.1, pass_)


FLOOR_CASE = case(FLOOR, "forward+backward")
SMALL = [FLOOR_CASE, case("native"), case("sparse")]


# Losses for the isolated children: module-level, so that the child can import them.


def kill_self_sigkill(input, target, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def kill_self_sigabrt(input, target, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGABRT)


# Helper processes a library keeps for the whole session (multiprocessing's resource tracker and
# fork server, inductor's compile workers): started by other tests in this process, not by a sweep.
_SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")


def _children_left(grace_s: float = 10.0) -> list[str]:
    """The command lines of this process's children still alive after `grace_s`, session helpers aside."""
    children = []
    for child in psutil.Process().children():
        try:
            if not any(helper in " ".join(child.cmdline()) for helper in _SESSION_HELPERS):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    return [" ".join(child.cmdline()) for child in alive]


def interrupt_parent(input, target, *args, **kwargs):
    os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C, as the parent sees it
    time.sleep(60)


def broken(*args, **kwargs):
    raise RuntimeError("kernel launch failed")


# --- 8. one writer per output directory ------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from lsr.bench.data import Case, FLOOR
from lsr.bench.sweep.runner import run_sweep

def hang(input, target, *args, **kwargs):
    print("measuring", flush=True)
    time.sleep(600)

cases = [Case(FLOOR, "cpu", "float32", 4, 3, 0.1, "forward+backward"), Case("native", "cpu", "float32", 4, 3, 0.1, "forward")]
run_sweep(cases, Path(sys.argv[1]), loss_fns={"native": hang}, min_time=0.001, progress=False)
"""


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_holder_blocks_nothing(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "measuring"  # the floor's row is on disk by now
        with pytest.raises(SweepLocked, match=rf"pid {holder.pid}: .*-c"):
            run_sweep(SMALL, tmp_path, **FAST)
        assert len(read_rows(tmp_path)) == 1  # the refused sweep wrote nothing
    finally:
        holder.kill()
        holder.wait()
    rows = run_sweep(SMALL, tmp_path, resume=True, **FAST)  # the kernel released the dead one's lock
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert not (tmp_path / LOCK_FILE).exists()  # a sweep that ends takes its lock file with it


# --- 9, 10. resume ------------------------------------------------------------------------------------


def test_resume_with_a_narrower_grid_keeps_every_row_outside_it(tmp_path):
    first = run_sweep(SMALL, tmp_path, loss_fns={"sparse": broken}, **FAST)
    assert [r["status"] for r in first] == ["ok", "ok", "error"]
    again = run_sweep(SMALL[:2], tmp_path, resume=True, **FAST)
    assert again == first and read_rows(tmp_path) == first


def test_resume_refuses_rows_measured_with_other_settings_even_without_metadata(tmp_path):
    first = run_sweep(SMALL[:2], tmp_path, **FAST)
    assert {(r["min_time"], r["logit_std"]) for r in first} == {(0.001, 2.0)}
    (tmp_path / "metadata.json").unlink()
    with pytest.raises(ResumeRefused, match="cannot resume.*min_time"):
        run_sweep(SMALL, tmp_path, resume=True, min_time=0.002, progress=False)
    assert read_rows(tmp_path) == first
    mixed = run_sweep(SMALL, tmp_path, resume=True, resume_mixed=True, min_time=0.002, progress=False)
    assert [r["min_time"] for r in mixed] == [0.001, 0.001, 0.002]


def test_thread_counts_are_cases_of_their_own(tmp_path):
    """A case at 1 thread and at 2 are two rows, each measured at its count (torch's own restored),
    and resume keeps both; the charts and tables other than the threads chart see the 2-thread rows."""
    from lsr.bench.report.selection import at_all_cores, thread_scaling

    threads = torch.get_num_threads()
    cases = [Case(FLOOR, "cpu", "float32", 64, 512, 0.1, "forward+backward", threads=t) for t in (1, 2)]
    cases += [Case("native", "cpu", "float32", 64, 512, 0.1, "forward+backward", threads=t) for t in (1, 2)]
    rows = run_sweep(cases, tmp_path, **FAST)
    assert [(r["implementation"], r["threads"], r["status"]) for r in rows] == [
        (FLOOR, 1, "ok"),
        (FLOOR, 2, "ok"),
        ("native", 1, "ok"),
        ("native", 2, "ok"),
    ]
    assert torch.get_num_threads() == threads
    assert run_sweep(cases, tmp_path, resume=True, **FAST) == rows  # nothing measured again
    assert [r["threads"] for r in at_all_cores(rows)] == [2, 2]
    scaling = thread_scaling(rows)
    assert len(scaling) == 2 and all(step.threads == 2 for steps in scaling.values() for step in steps)


def test_schema_1_rows_take_the_settings_of_their_metadata_on_resume(tmp_path):
    rows = run_sweep(SMALL[:1], tmp_path, **FAST)
    old_columns = [c for c in results.COLUMN_TYPES if c not in results.ADDED_LATER]
    lines = [
        ",".join(old_columns),
        ",".join("" if rows[0][c] is None else str(rows[0][c]) for c in old_columns),
    ]
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    assert run_sweep(SMALL[:2], tmp_path, resume=True, **FAST)[0]["min_time"] == 0.001
    (tmp_path / "metadata.json").unlink()
    (tmp_path / "results.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResumeRefused, match="None"):  # settings unknown: not the same
        run_sweep(SMALL[:2], tmp_path, resume=True, **FAST)


# --- 11. memory -----------------------------------------------------------------------------------------


def test_cpu_allocator_failure_is_oom(tmp_path):
    def allocate_too_much(*args, **kwargs):
        return torch.empty(2**45)  # 128 TiB: PyTorch's CPU allocator refuses at once

    rows = run_sweep(SMALL[:2], tmp_path, loss_fns={"native": allocate_too_much}, **FAST)
    assert rows[1]["status"] == "oom" and "DefaultCPUAllocator" in rows[1]["message"]


def test_isolated_children_killed_by_signals_cost_their_rows_only(tmp_path):
    loss_fns = {"native": kill_self_sigkill, "sparse": kill_self_sigabrt}
    rows = run_sweep(SMALL, tmp_path, isolate="size", loss_fns=loss_fns, **FAST)  # two children
    assert [r["status"] for r in rows] == ["ok", "oom", "crashed"]
    assert "SIGKILL" in rows[1]["message"] and "SIGABRT" in rows[2]["message"]
    assert rows[2]["min_time"] == 0.001 and read_rows(tmp_path) == rows
    with pytest.raises(ValueError, match="importable"):
        run_sweep(SMALL, tmp_path, isolate="case", loss_fns={"native": lambda *a, **k: None}, **FAST)


def test_interrupting_an_isolated_sweep_ends_its_child(tmp_path):
    with pytest.raises(SweepInterrupted) as interrupted:
        run_sweep(SMALL[1:2], tmp_path, isolate="case", loss_fns={"native": interrupt_parent}, **FAST)
    assert (interrupted.value.done, interrupted.value.total) == (0, 1)
    assert _children_left() == []


def test_cases_beyond_the_available_memory_are_skipped(tmp_path):
    huge = [case(name, "forward+backward", batch=2**20, classes=2**20) for name in (FLOOR, "dense")]
    rows = run_sweep(huge, tmp_path, **FAST)  # 4 TiB of logits
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert re.match(r"estimated peak 20480\.\d\d GiB exceeds the .* GiB available", rows[1]["message"])


def test_cases_an_implementation_cannot_take_are_recorded_as_such(tmp_path):
    cases = [
        case("sparse", classes=1),
        case("fused-exact-inplace", "backward"),
        Case("native", "mps", "float32", 4, 3, 0.1, "forward"),
    ]
    rows = run_sweep(cases, tmp_path, **FAST)
    assert [r["status"] for r in rows] == ["unsupported", "unsupported", "not-available"]


# --- 13. interruption -------------------------------------------------------------------------------------


def test_interruption_says_how_far_the_sweep_got(tmp_path):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted) as interrupted:
        run_sweep(SMALL, tmp_path, loss_fns={"native": interrupt}, **FAST)
    assert (interrupted.value.done, interrupted.value.total) == (1, 3)
    assert [r["implementation"] for r in read_rows(tmp_path)] == [FLOOR]


# --- 14. results files --------------------------------------------------------------------------------------


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
    rows = run_sweep(SMALL[:2], tmp_path, **FAST)
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

    rows = run_sweep(SMALL[:1], tmp_path, grid={"batches": [4]}, **FAST)
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
    rows = run_sweep(SMALL[:2], tmp_path, **FAST)
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
        run_sweep(SMALL[:2], tmp_path, resume=True, **FAST) == old
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


# --- 15. busy machine -----------------------------------------------------------------------------------------


def test_rows_timed_on_a_busy_machine_are_marked_and_warned_about(tmp_path):
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(math.ceil(0.3 * psutil.cpu_count()))
    ]
    try:
        time.sleep(0.2)  # running
        with pytest.warns(BusyMachineWarning, match="1 of 1 cases"):
            rows = run_sweep(SMALL[:1], tmp_path, min_time=0.5, progress=False)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert rows[0]["status"] == "ok" and rows[0]["busy"] is True and rows[0]["other_load"] > 0.2
    assert busy_rows(rows) == rows == read_rows(tmp_path)


def test_compare_ignores_or_marks_busy_rows(tmp_path):
    old = run_sweep(SMALL[:2], tmp_path, **FAST)
    new = [old[0] | {"busy": True}, old[1] | {"busy": False}]
    assert [e["busy"] for e in compare(old, new)] == [True, False]
    assert [e["case"] for e in compare(old, new, ignore_busy=True)] == [Case.of_row(old[1])]
    assert "1 were timed on a busy machine" in format_comparison(compare(old, new))


def test_a_registered_implementation_has_a_memory_factor():
    """Each states its own (the default, 4, assumes the dense baseline's appetite)."""
    factors = {impl.peak_factor for impl in lsr.REGISTRY.values()}
    assert all(1.0 <= f <= 4.0 for f in factors) and len(factors) > 2
