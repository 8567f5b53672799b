"""The sweep layer: the runner's guarantees (one writer, resume that loses nothing and mixes nothing,
memory failures recorded, in child processes too, interruption, busy-machine rows), failures
recorded and the sweep going on, and the grid's eligibility."""

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

import lsr
from helpers import FAST, eager_grid, small_sweep, wrong_smoothing
from lsr.bench import data as results
from lsr.bench.data import (
    FLOOR,
    FLOOR_ALLOC,
    Case,
    busy_rows,
    read_rows,
)
from lsr.bench.sweep.grid import Grid
from lsr.bench.sweep.runner import (
    LOCK_FILE,
    BusyMachineWarning,
    ResumeRefused,
    SweepInterrupted,
    SweepLocked,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]


def case(implementation: str, pass_: str = "forward", batch: int = 4, classes: int = 3) -> Case:
    return Case(implementation, "cpu", "float32", batch, classes, 0.1, pass_)


SMALL = small_sweep()  # the floor, native and sparse at N 4, C 3
FLOOR_CASE = SMALL[0]


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


def test_resume_measures_failed_rows_again_and_refuses_other_settings(tmp_path):
    cases = list(Grid(["native"], ["cpu"], ["float32"], [4], [3], passes=["forward"]).cases())
    first = run_sweep(cases, tmp_path, loss_fns={"native": wrong_smoothing}, **FAST)
    assert [r["implementation"] for r in first] == [FLOOR, FLOOR_ALLOC, "native"]
    assert [r["status"] for r in first] == ["ok", "ok", "failed"]
    again = run_sweep(cases, tmp_path, resume=True, **FAST)
    assert [r["status"] for r in again] == ["ok", "ok", "ok"] and again[:2] == first[:2]
    with pytest.raises(ValueError, match="cannot resume"):
        run_sweep(cases, tmp_path, resume=True, logit_std=5.0, **FAST)


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    rows = run_sweep(eager_grid().cases(), tmp_path, loss_fns={"native": out_of_memory}, **FAST)
    assert len(rows) == len(list(eager_grid().cases()))
    native = [r for r in rows if r["implementation"] == "native"]
    assert all(r["status"] == "oom" and "Tried to allocate" in r["message"] for r in native)
    assert all(r["status"] == "ok" for r in rows if r["implementation"] != "native")
    assert read_rows(tmp_path) == rows  # what is on disk is what was returned


def test_other_errors_are_recorded(tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    rows = run_sweep(eager_grid().cases(), tmp_path, loss_fns={"sparse": broken}, **FAST)
    assert {r["status"] for r in rows if r["implementation"] == "sparse"} == {"error"}


def test_interrupted_sweep_keeps_rows_and_resume_skips_them(tmp_path):
    cases = list(eager_grid().cases())
    calls = {"n": 0}

    def interrupt_on_second_size(input, target, *args, **kwargs):
        if input.shape[0] == 32:
            raise KeyboardInterrupt
        calls["n"] += 1
        return lsr.native_label_smoothing(input, target, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(cases, tmp_path, loss_fns={"native": interrupt_on_second_size}, **FAST)
    kept = read_rows(tmp_path)
    assert 0 < len(kept) < len(cases)
    assert {r["batch"] for r in kept if r["implementation"] == "native"} == {8}

    calls["n"] = 0
    rows = run_sweep(cases, tmp_path, resume=True, loss_fns={"native": wrong_smoothing}, **FAST)
    assert len(rows) == len(cases)
    assert rows[: len(kept)] == kept  # measured once, kept as they were
    assert {(r["implementation"], r["pass"], r["batch"]) for r in rows} == {
        (c.implementation, c.pass_, c.batch) for c in cases
    }


def test_in_place_implementations_are_gated_and_timed(tmp_path):
    """They overwrite their logits: the sweep gives them logits of their own, a non-leaf as in training."""
    grid = Grid(["fused-exact-inplace", "native"], ["cpu"], ["float32"], batches=[8], classes=[10])
    rows = run_sweep(grid.cases(), tmp_path, **FAST)
    inplace = [r for r in rows if r["implementation"] == "fused-exact-inplace"]
    assert [r["pass"] for r in inplace] == ["forward", "forward+backward"]  # no backward-only pass
    assert all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]


def test_floor_rows_and_grid_skip_what_cannot_run():
    grid = Grid(["sparse", "native"], ["cpu"], ["float32"], batches=[4], classes=[1, 5])
    cases = list(grid.cases())
    assert [c for c in cases if c.implementation == FLOOR and c.classes == 1]
    assert not [c for c in cases if c.implementation == "sparse" and c.classes == 1]
