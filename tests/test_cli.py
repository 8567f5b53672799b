"""The cli layer, `lsr-bench` as a user meets it: refusals before measuring, Ctrl-C, --out, metadata,
compare, help, and a run plotted and compared end to end."""

import argparse
import functools
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import lsr
from helpers import EAGER, PLAIN
from lsr.bench import cli
from lsr.bench.cli import commands
from lsr.bench.cli import main as cli_main
from lsr.bench.data import (
    FLOOR,
    FLOOR_ALLOC,
    FLOORS,
    METADATA_FILE,
    RESULTS_FILE,
    Case,
    new_row,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)
from lsr.bench.report import plot, style
from lsr.bench.report.summary import CHARTS
from lsr.bench.sweep import grid as grids
from lsr.bench.sweep import runner
from lsr.bench.sweep.grid import PRESETS, Grid

TINY = ["--impl", "native", "--batch", "4", "--classes", "3", "--min-time", "0.001", "--no-plot"]
# ... and one variant, which makes the preset's grids one: a case per pass and the two floors
TINY += ["--dtype", "float32", "--smoothing", "0.1", "--ignore-fraction", "0", "--weighted", "off"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `lsr-bench argv`, as a shell would see them."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # what Python prints and returns for an uncaught SystemExit
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def fake_run(folder: Path, medians: dict[tuple[int, int], float], device: str = "cpu", busy=()) -> Path:
    """A results folder with the floors' and native's forward+backward rows at each (N, C), native's
    median given; those at the sizes in `busy` timed on a busy machine."""
    rows = []
    for (n, c), median in medians.items():
        for name, scale in ((FLOOR, 0.5), (FLOOR_ALLOC, 0.6), ("native", 1.0)):
            kind = FLOOR if name in FLOORS else lsr.get(name).smoothing_kind
            row = new_row(Case(name, device, "float32", n, c, 0.1, "forward+backward"), kind)
            timing = {"median_s": median * scale, "iqr_s": 1e-6, "runs": 7, "threads": 1}
            rows.append(row | timing | {"busy": (n, c) in busy})
    write_rows(folder / RESULTS_FILE, rows)
    write_metadata(folder / METADATA_FILE, {"device": device, "device_name": "test machine"})
    return folder


@pytest.fixture
def sweeps(monkeypatch) -> list[dict]:
    """run_sweep replaced by a recorder: what the CLI asked for, with nothing measured."""
    calls = []

    def record(cases, out_dir, **options):
        calls.append({"cases": list(cases), "out_dir": out_dir, **options})
        return []

    monkeypatch.setattr(commands, "run_sweep", record)
    return calls


# --- 12: bad arguments are refused before anything is measured ---------------------------------------

BAD = [
    *("--batch 0", "--batch -5", "--classes 0", "--threads 0"),
    *("--smoothing 1.5", "--smoothing -0.1", "--smoothing nan"),
    *("--logit-std 0", "--logit-std inf", "--logit-std nan", "--min-time 0", "--min-time -1"),
    *("--impl sparse --classes 1", "--out {file}", "--out {file}/cpu"),
    *("--ignore-fraction 1", "--ignore-fraction -0.1", "--ignore-fraction nan", "--weighted maybe"),
    "--impl sparse --weighted on",
]


@pytest.mark.parametrize("bad", BAD)
def test_bad_arguments_are_refused_in_one_line_before_measuring(bad, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(commands, "run_sweep", lambda *a, **k: pytest.fail("measured before refusing"))
    argv = ["run", "--batch", "4", "--classes", "3", "--out", str(tmp_path / "out")]
    code, _, err = run_cli(argv + bad.format(file=tmp_path / "file").split(), capsys)
    assert code == 2
    assert err.startswith("lsr-bench: ") and err.count("\n") == 1, err
    if "sparse --classes" in bad:
        assert "sparse needs at least 2 classes" in err
    if "sparse --weighted" in bad:
        assert "sparse takes no class weights: nothing to measure" in err


def test_the_default_list_leaves_out_what_cannot_take_the_classes(tmp_path, capsys, sweeps):
    argv = ["run", "--device", "cpu", "--batch", "4", "--classes", "1", "3", "--out", str(tmp_path)]
    assert run_cli([*argv, "--no-plot"], capsys)[0] == 0
    sparse = {c.classes for c in sweeps[0]["cases"] if c.implementation == "sparse"}
    assert sparse == {3}


# --- 13: Ctrl-C and a locked directory ----------------------------------------------------------------


def interrupt_at_batch_8(input, target, *args, **kwargs):
    if input.shape[0] == 8:
        raise KeyboardInterrupt
    return lsr.native_label_smoothing(input, target, *args, **kwargs)


def test_ctrl_c_says_how_far_it_got_and_exits_130(tmp_path, capsys, monkeypatch):
    real = functools.partial(runner.run_sweep, loss_fns={"native": interrupt_at_batch_8})
    monkeypatch.setattr(commands, "run_sweep", real)
    argv = ["run", *TINY, "--batch", "4", "8", "--pass", "forward+backward", "--out", str(tmp_path)]
    code, _, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 130
    # the two floors and native at N=4, then the floors at N=8; native at N=8 was interrupted
    assert err.splitlines()[-1] == (
        "lsr-bench: interrupted after 5 of 6 cases; rerun with --resume to continue"
    )


def test_ctrl_c_in_a_real_process_leaves_no_traceback(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "lsr.bench", "run", *TINY, "--min-time", "0.2", "--no-progress"]
    command += ["--batch", *[str(2**k) for k in range(2, 12)], "--out", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    results = out / "cpu" / RESULTS_FILE
    # Interrupt inside the measuring loop: once a few rows are on disk (the file's header is written first).
    while not (results.exists() and results.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted after" in err.splitlines()[-1] and "--resume" in err.splitlines()[-1]


def test_a_locked_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "cpu").mkdir()
    with runner.output_lock(tmp_path / "cpu"):  # another sweep holds it
        code, _, err = run_cli(["run", *TINY, "--out", str(tmp_path)], capsys)
    assert code == 75 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"lsr-bench: another sweep is writing to {tmp_path / 'cpu'}")


# --- 17: plot honours --out and compares like with like ------------------------------------------------


@pytest.fixture
def one_chart(monkeypatch):
    """Draw one chart per run, not all six: the tests are about where charts go."""
    monkeypatch.setattr(plot, "DRAW", {"floor_multiple": plot.DRAW["floor_multiple"]})


def test_plot_writes_every_chart_under_out(tmp_path, capsys, one_chart):
    a = fake_run(tmp_path / "x" / "cpu", {(4, 3): 1e-3, (8, 3): 2e-3})
    b = fake_run(tmp_path / "y" / "cpu", {(8, 3): 3e-3})
    charts = tmp_path / "charts"
    assert run_cli(["plot", str(a), str(b / RESULTS_FILE), "--out", str(charts)], capsys)[0] == 0
    assert not list(tmp_path.glob("[xy]/**/*.png"))  # nothing beside the inputs
    assert (charts / "x_cpu" / "floor_multiple_float32.png").exists()
    assert (charts / "y_cpu" / "floor_multiple_float32.png").exists()
    assert (charts / "side_by_side.png").exists()


def test_side_by_side_compares_the_same_shapes(tmp_path, capsys, one_chart, monkeypatch):
    # Every shape has N·C = 24: only (8, 3) is in both runs, and it alone may be compared.
    a = fake_run(tmp_path / "a", {(4, 6): 1e-3, (8, 3): 2e-3})
    b = fake_run(tmp_path / "b", {(8, 3): 3e-3, (2, 12): 1e-4})
    figures = []
    monkeypatch.setattr(style, "save", lambda fig, path: figures.append(fig) or path)
    assert run_cli(["plot", str(a), str(b), "--out", str(tmp_path / "out")], capsys)[0] == 0
    panels = figures[-1].axes[:2]
    assert [[t.get_text() for t in ax.get_xticklabels()] for ax in panels] == [["8×3"], ["8×3"]]
    native = [next(line for line in ax.lines if line.get_label() == "native") for ax in panels]
    assert [list(line.get_ydata()) for line in native] == [[2e-3], [3e-3]]

    c = fake_run(tmp_path / "c", {(4, 3): 1e-3})
    code, _, err = run_cli(["plot", str(a), str(c), "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "in every input" in err and not (tmp_path / "none").exists()


# --- 18: help, metadata, compare, warnings, the runner's new options -----------------------------------


def test_every_option_states_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                text = command._get_formatter()._expand_help(action)
                assert "default" in text and "default: None" not in text, f"{name}: {text}"


def test_metadata_records_the_grid_run_and_a_preset_only_when_unchanged(tmp_path, capsys, monkeypatch):
    argv = ["run", *TINY, "--pass", "forward", "--no-progress", "--out", str(tmp_path / "custom")]
    assert run_cli(argv, capsys)[0] == 0
    metadata = read_metadata(tmp_path / "custom" / "cpu")
    assert metadata.get("preset") is None
    assert metadata["grid"] == {
        "implementations": ["native"],
        "devices": ["cpu"],
        "dtypes": ["float32"],
        "batches": [4],
        "classes": [3],
        "smoothings": [0.1],
        "passes": ["forward"],
        "ignore_fractions": [0.0],
        "weighted": [False],
        "threads": ["all"],
    }

    monkeypatch.setitem(PRESETS["quick"], "cpu", Grid(["native"], ["cpu"], ["float32"], [4], [3]))
    argv = ["run", "--device", "cpu", "--min-time", "0.001", "--no-plot", "--no-progress"]
    assert run_cli([*argv, "--out", str(tmp_path / "preset")], capsys)[0] == 0
    metadata = read_metadata(tmp_path / "preset" / "cpu")
    assert metadata["preset"] == "quick" and metadata["grid"]["batches"] == [4]


def test_compare_takes_results_roots(tmp_path, capsys):
    fake_run(tmp_path / "old" / "cpu", {(4, 3): 1e-3})
    fake_run(tmp_path / "old" / "mps", {(4, 3): 1e-3}, device="mps")
    fake_run(tmp_path / "new" / "cpu", {(4, 3): 3e-3})
    code, out, err = run_cli(["compare", str(tmp_path / "old"), str(tmp_path / "new")], capsys)
    assert code == 0 and "3 cases compared, 3 changed" in out
    assert "mps is in only one of the two" in err
    code, out, _ = run_cli(["compare", str(tmp_path / "old"), str(tmp_path / "new" / "cpu")], capsys)
    assert code == 0 and "3 cases compared" in out
    code, _, err = run_cli(["compare", str(tmp_path / "old"), str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.startswith("lsr-bench: no results file")


def test_compare_can_leave_out_busy_rows(tmp_path, capsys):
    old = fake_run(tmp_path / "old", {(4, 3): 1e-3, (8, 3): 1e-3})
    new = fake_run(tmp_path / "new", {(4, 3): 1e-3, (8, 3): 1e-3}, busy={(8, 3)})
    code, out, _ = run_cli(["compare", str(old), str(new)], capsys)
    assert code == 0 and "6 cases compared" in out and "3 were timed on a busy machine" in out
    code, out, _ = run_cli(["compare", str(old), str(new), "--ignore-busy"], capsys)
    assert code == 0 and "3 cases compared" in out


def warn_then_native(input, target, *args, **kwargs):
    warnings.warn(
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        UserWarning,
        stacklevel=2,
    )
    return lsr.native_label_smoothing(input, target, *args, **kwargs)


def test_warnings_come_after_the_progress_bar_once(tmp_path, capsys, monkeypatch):
    real = functools.partial(runner.run_sweep, loss_fns={"native": warn_then_native})
    monkeypatch.setattr(commands, "run_sweep", real)
    code, _, err = run_cli(["run", *TINY, "--out", str(tmp_path)], capsys)
    assert code == 0
    held = [line for line in err.splitlines() if "The .grad attribute" in line]
    assert len(held) == 1 and held[0].startswith("lsr-bench: warning")
    assert err.index(held[0]) > err.rindex("100%")  # after the bar's last state, on its own line


def test_ignore_fractions_and_weights_reach_the_grid(tmp_path, capsys, sweeps):
    argv = ["run", *TINY, "--ignore-fraction", "0", "0.3", "--weighted", "off", "on", "--out", str(tmp_path)]
    assert run_cli(argv, capsys)[0] == 0
    native = {(c.ignore_fraction, c.weighted) for c in sweeps[0]["cases"] if c.implementation == "native"}
    assert native == {(0.0, False), (0.0, True), (0.3, False), (0.3, True)}
    recorded = sweeps[0]["grid"]  # one grid's fields, or a list of them: TINY leaves two passes lists
    for grid in recorded if isinstance(recorded, list) else [recorded]:
        assert grid["ignore_fractions"] == [0.0, 0.3] and grid["weighted"] == [False, True]

    # without the options, each of the preset's grids keeps its own
    argv = ["run", "--impl", "native", "--batch", "4", "--classes", "3", "--out", str(tmp_path / "preset")]
    assert run_cli([*argv, "--no-plot"], capsys)[0] == 0
    preset = {(c.ignore_fraction, c.weighted) for c in sweeps[1]["cases"] if c.implementation == "native"}
    expected = {
        (f, w)
        for grid in grids.preset_grids("quick", "cpu")
        for f in grid.ignore_fractions
        for w in grid.weighted
    }
    assert preset == expected and len(expected) > 1


def test_run_prints_both_floors_bandwidth_and_the_ship_table(tmp_path, capsys):
    argv = ["run", *TINY, "--impl", "native", "fused-exact", "--pass", "forward+backward", "--no-progress"]
    code, out, _ = run_cli([*argv, "--out", str(tmp_path)], capsys)
    assert code == 0
    table, ship = out.split("Which one to ship")
    assert [line.split()[0] for line in table.splitlines()[3:5]] == [FLOOR, FLOOR_ALLOC]
    assert "GB/s" in table.splitlines()[1] and "% copy" in table.splitlines()[1]
    assert "exact smoothing, out-of-place" in ship and "vs native" in ship


def test_run_passes_the_runner_options(tmp_path, capsys, sweeps):
    argv = ["run", *TINY, "--isolate", "size", "--resume-mixed", "--out", str(tmp_path)]
    assert run_cli(argv, capsys)[0] == 0
    assert sweeps[0]["isolate"] == "size" and sweeps[0]["resume_mixed"] and sweeps[0]["resume"]


def test_rows_measured_on_a_busy_machine_are_reported(tmp_path, capsys, monkeypatch):
    def two_busy(*args, **kwargs):
        rows = runner.run_sweep(*args, **kwargs)
        return [r | {"busy": i < 2} for i, r in enumerate(rows)]

    monkeypatch.setattr(commands, "run_sweep", two_busy)
    code, _, err = run_cli(["run", *TINY, "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "lsr-bench: warning: 2 of 5 rows were measured while other processes loaded" in err


def test_a_launch_without_torchruns_variables_is_refused_in_one_line(tmp_path, capsys, monkeypatch, sweeps):
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(["run", *TINY, "--out", str(tmp_path)], capsys)
    assert code == 2 and sweeps == []
    assert (
        err
        == "lsr-bench: WORLD_SIZE is 2 but RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: launch with torchrun\n"
    )


def test_cli_refuses_an_implementation_that_cannot_run(tmp_path, capsys):
    argv = ["run", "--impl", "sparse", "--classes", "1", "--batch", "4", "--out", str(tmp_path)]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == "lsr-bench: sparse needs at least 2 classes, got --classes 1\n"


def test_cli_run_plot_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["run", "--impl", *EAGER, "--device", "cpu", "--batch", "16", "64", "--classes", "10", "100"]
    args += ["--dtype", "float32", "--smoothing", "0.1", "--ignore-fraction", "0", "--weighted", "off"]
    args += ["--out", str(out), "--min-time", "0.001", "--no-progress", "--threads", "1", "2"]
    assert cli_main(args) == 0
    rows = read_rows(out / "cpu")
    assert all(r["status"] == "ok" for r in rows)
    assert {(r["dtype"], r["smoothing"], r["ignore_fraction"], r["weighted"]) for r in rows} == {PLAIN}
    # threads x sizes x (the two floors + implementations x passes)
    assert len(rows) == 2 * 4 * (2 + 3 * 3) and {r["threads"] for r in rows} == {1, 2}
    assert read_metadata(out / "cpu")["thread_counts"] == [1, 2]
    for chart in CHARTS:  # a chart per dtype and case variant (smoothing, padding, weights)
        pngs = list((out / "cpu").glob(f"{chart}_float32*.png"))
        assert pngs and all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    summary = (out / "README.md").read_text()
    assert "| 64 | 100 | sparse |" in summary and "![speedup float32" in summary
    assert "(cpu/speedup_float32" in summary and "(cpu/thread_scaling_float32" in summary
    efficiency = summary.split("parallel efficiency")[1].split("\n")[2]  # the first size's first row
    # a number (what it is at these tiny sizes on a shared 2-core machine is anyone's guess)
    assert float(efficiency.rstrip(" |").split("|")[-1]) >= 0
    printed = capsys.readouterr().out
    assert "x floor" in printed and "threads" in printed.splitlines()[1]

    shutil.copytree(out / "cpu", tmp_path / "other")
    assert cli_main(["plot", str(out / "cpu"), str(tmp_path / "other"), "--out", str(tmp_path / "side")]) == 0
    assert (tmp_path / "side" / "side_by_side.png").exists()
    assert cli_main(["compare", str(out / "cpu"), str(tmp_path / "other")]) == 0
    assert "cases compared" in capsys.readouterr().out


def test_cli_reports_a_malformed_file_clearly(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("not,a,results,file\n")
    assert cli_main(["plot", str(tmp_path / "results.csv")]) == 2
    assert "not a results file" in capsys.readouterr().err


def test_a_run_never_replaces_results_it_did_not_measure(tmp_path, capsys):
    """Rows of another machine (or commit, or grid) in OUT: refused in one line naming them, unless
    --overwrite (which says what it replaced and drops the old charts) or --resume (which keeps them)."""
    folder = fake_run(tmp_path / "cpu", {(64, 100): 1e-3})
    same_settings = [row | {"min_time": 0.001, "logit_std": 2.0} for row in read_rows(folder)]
    write_rows(folder / RESULTS_FILE, same_settings)  # so that --resume may keep them
    write_metadata(
        folder / METADATA_FILE, {"device": "cpu", "machine": "epyc-2c-avx2", "git_commit": "abc123"}
    )
    (folder / "old_chart.png").write_bytes(b"\x89PNG")
    code, _, err = run_cli(["run", *TINY, "--no-progress", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds 3 rows measured on epyc-2c-avx2 at commit abc123" in err and "--overwrite" in err
    assert len(read_rows(folder)) == 3  # untouched

    code, _, err = run_cli(["run", *TINY, "--no-progress", "--resume", "--out", str(tmp_path)], capsys)
    assert code == 0 and len(read_rows(folder)) == 3 + 5  # kept, and this grid's cases added

    folder = fake_run(tmp_path / "again" / "cpu", {(64, 100): 1e-3})
    (folder / "old_chart.png").write_bytes(b"\x89PNG")
    argv = ["run", *TINY, "--no-progress", "--overwrite", "--out", str(tmp_path / "again")]
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "--overwrite: replacing what" in err and not (folder / "old_chart.png").exists()
    assert {r["batch"] for r in read_rows(folder)} == {4}

    # the same machine, commit and grid: a rerun replaces its own rows without being asked
    code, _, _ = run_cli(["run", *TINY, "--no-progress", "--out", str(tmp_path / "again")], capsys)
    assert code == 0


def test_compare_and_side_by_side_say_when_the_machines_differ(tmp_path, capsys, one_chart):
    old = fake_run(tmp_path / "old", {(64, 100): 1e-3, (128, 100): 2e-3})
    new = fake_run(tmp_path / "new", {(64, 100): 1e-3, (128, 100): 2e-3})
    write_metadata(old / METADATA_FILE, {"device": "cpu", "vector_isa": "avx2", "cpu_model": "AMD EPYC"})
    write_metadata(new / METADATA_FILE, {"device": "cpu", "vector_isa": "avx512f", "cpu_model": "AMD EPYC"})
    code, out, _ = run_cli(["compare", str(old), str(new)], capsys)
    assert code == 0 and "different machines (vector_isa avx2 -> avx512f)" in out.splitlines()[0]
    code, _, err = run_cli(["plot", str(old), str(new), "--out", str(tmp_path / "charts")], capsys)
    assert code == 0 and "different machines (vector_isa avx2 -> avx512f)" in err
    write_metadata(new / METADATA_FILE, {"device": "cpu", "vector_isa": "avx2", "cpu_model": "AMD EPYC"})
    assert "different machines" not in run_cli(["compare", str(old), str(new)], capsys)[1]
