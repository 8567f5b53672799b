"""The benchmark's machinery: the memory meter, the gate, failures, resume, schema, CLI, asv."""

import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

import lsr
from helpers import run_pytest
from lsr.bench import measure
from lsr.bench.cli import main as cli_main
from lsr.bench.data import FLOOR, FLOOR_ALLOC, Case, SchemaError, read_metadata, read_rows, write_rows
from lsr.bench.report.compare import compare
from lsr.bench.report.summary import CHARTS
from lsr.bench.sweep.grid import Grid
from lsr.bench.sweep.runner import run_sweep

EAGER = ["native", "dense", "sparse"]
TINY = Grid(EAGER, ["cpu"], ["float32"], batches=[8, 32], classes=[10])
FAST = dict(min_time=0.001, progress=False)
PLAIN = ("float32", 0.1, 0.0, False)  # dtype, smoothing, ignore fraction, weighted of the plain sweep


# --- the CPU memory meter -------------------------------------------------------------------------


def test_cpu_meter_measures_a_known_allocation_exactly():
    assert measure.cpu_peak_bytes(lambda: torch.empty(1000, 1000)) == 4_000_000
    assert measure.cpu_peak_bytes(lambda: torch.empty(3, 5, dtype=torch.float64)) == 120


def test_cpu_meter_takes_the_peak_not_the_end():
    def two_temporaries():
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB, both alive: 3 MB
        del a, b
        return torch.empty(100_000)  # 0.4 MB at the end

    assert measure.cpu_peak_bytes(two_temporaries) == 3_000_000


def test_cpu_meter_ignores_what_existed_before():
    before = torch.empty(1_000_000)

    def free_then_allocate():
        nonlocal before
        before = None  # frees 4 MB allocated before the pass
        return torch.empty(10)

    assert measure.cpu_peak_bytes(free_then_allocate) == 40


def test_native_forward_backward_peak_is_three_logits():
    """log_softmax saved for backward, its gradient, the input's gradient: 3 x 4 MB at 1000 x 1000 float32."""
    case = Case("native", "cpu", "float32", 1000, 1000, 0.1, "forward+backward")
    timed = measure.TimedPass(case, measure.Problem.make(case), lsr.get("native"))
    peak = measure.peak_bytes(timed, torch.device("cpu"))
    assert 12_000_000 <= peak <= 12_100_000


def test_measurement_keeps_samples_and_flags_a_wide_spread():
    steady = measure.time_pass(lambda: sum(range(1000)), min_time=0.01, min_samples=5)
    assert len(steady.samples) >= 5 and steady.runs == len(steady.samples) * steady.runs_per_sample
    assert steady.median == statistics.median(steady.samples) and steady.threads == torch.get_num_threads()
    noisy = measure.Measurement((1.0, 1.0, 2.0, 3.0, 3.0), runs_per_sample=1, threads=1)
    assert noisy.median == 2.0 and noisy.iqr == 2.0 and "IQR 100%" in noisy.warning


# --- the sweep: gate, failures, resume ------------------------------------------------------------


def wrong_smoothing(input, target, smoothing, reduction="mean", ignore_index=-100):
    return lsr.native_label_smoothing(input, target, min(1.0, smoothing + 0.05), reduction, ignore_index)


def test_gate_rejects_a_wrong_implementation(tmp_path):
    rows = run_sweep(TINY.cases(), tmp_path, loss_fns={"dense": wrong_smoothing}, **FAST)
    dense = [r for r in rows if r["implementation"] == "dense"]
    assert dense and all(r["status"] == "failed" for r in dense)
    assert all(r["median_s"] is None for r in dense)  # a wrong answer is never timed
    assert "float64 reference" in dense[0]["message"]
    assert all(r["status"] == "ok" for r in rows if r["implementation"] != "dense")


def test_gate_checks_the_timed_mean_reduction(tmp_path):
    def wrong_mean(input, target, smoothing, reduction="mean", ignore_index=-100):
        loss = lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index)
        return loss * 1.01 if reduction == "mean" else loss

    rows = run_sweep(TINY.cases(), tmp_path, loss_fns={"sparse": wrong_mean}, **FAST)
    assert {r["status"] for r in rows if r["implementation"] == "sparse"} == {"failed"}


def test_resume_measures_failed_rows_again_and_refuses_other_settings(tmp_path):
    cases = list(Grid(["native"], ["cpu"], ["float32"], [4], [3], passes=["forward"]).cases())
    first = run_sweep(cases, tmp_path, loss_fns={"native": wrong_smoothing}, **FAST)
    assert [r["implementation"] for r in first] == [FLOOR, FLOOR_ALLOC, "native"]
    assert [r["status"] for r in first] == ["ok", "ok", "failed"]
    again = run_sweep(cases, tmp_path, resume=True, **FAST)
    assert [r["status"] for r in again] == ["ok", "ok", "ok"] and again[:2] == first[:2]
    with pytest.raises(ValueError, match="cannot resume"):
        run_sweep(cases, tmp_path, resume=True, logit_std=5.0, **FAST)


def test_cli_refuses_an_implementation_that_cannot_run(tmp_path, capsys):
    argv = ["run", "--impl", "sparse", "--classes", "1", "--batch", "4", "--out", str(tmp_path)]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err == "lsr-bench: sparse needs at least 2 classes, got --classes 1\n"


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    rows = run_sweep(TINY.cases(), tmp_path, loss_fns={"native": out_of_memory}, **FAST)
    assert len(rows) == len(list(TINY.cases()))
    native = [r for r in rows if r["implementation"] == "native"]
    assert all(r["status"] == "oom" and "Tried to allocate" in r["message"] for r in native)
    assert all(r["status"] == "ok" for r in rows if r["implementation"] != "native")
    assert read_rows(tmp_path) == rows  # what is on disk is what was returned


def test_other_errors_are_recorded(tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    rows = run_sweep(TINY.cases(), tmp_path, loss_fns={"sparse": broken}, **FAST)
    assert {r["status"] for r in rows if r["implementation"] == "sparse"} == {"error"}


def test_interrupted_sweep_keeps_rows_and_resume_skips_them(tmp_path):
    cases = list(TINY.cases())
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


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")
def test_the_gate_reads_no_value_that_requires_grad(impl):
    """An in-place loss returns its logits as the gradient: the gate must detach it before reading."""
    case = Case(impl.name, "cpu", "float32", 16, 10, 0.1, "forward+backward")
    assert measure.check_against_reference(case, measure.Problem.make(case), impl) < 1e-4


def test_floor_rows_and_grid_skip_what_cannot_run():
    grid = Grid(["sparse", "native"], ["cpu"], ["float32"], batches=[4], classes=[1, 5])
    cases = list(grid.cases())
    assert [c for c in cases if c.implementation == FLOOR and c.classes == 1]
    assert not [c for c in cases if c.implementation == "sparse" and c.classes == 1]


# --- the data ---------------------------------------------------------------------------------------


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


def test_compare_flags_changes_beyond_noise(tmp_path):
    measured = run_sweep(
        Grid(["native"], ["cpu"], ["float32"], [4], [3], passes=["forward"]).cases(), tmp_path, **FAST
    )
    old = [r | {"iqr_s": 0.0} for r in measured]  # a noiseless baseline: the verdict is about the ratio
    same = [r | {"median_s": r["median_s"] * 1.01} for r in old]
    slower = [r | {"median_s": r["median_s"] * 3, "iqr_s": 0.0} for r in old]
    assert not any(e["verdict"] for e in compare(old, same))
    assert all(e["verdict"] == "slower" for e in compare(old, slower))


# --- end to end -------------------------------------------------------------------------------------


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
    assert float(efficiency.rstrip(" |").split("|")[-1]) > 0
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


def test_asv_check():
    if shutil.which("asv") is None:
        pytest.skip("asv is not installed (extra: benchmarking)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["asv", "check", "--python=same"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "No problems found" in result.stdout, result.stdout + result.stderr
