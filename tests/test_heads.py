"""The LM head losses the benchmark compares (`lsr.heads`), and their benchmark: every head loss that
runs here against the float64 definition (loss, d_hidden, d_lm_weight), Liger's under the Triton
interpreter, what each refuses and why; the head gate, cases, grid, statuses, charts, tables and
command line (`lsr.bench` with `hidden` > 0)."""

from __future__ import annotations

import csv
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lsr.heads
from conftest import TRITON_INTERPRETER
from lsr.bench import measure, sweep
from lsr.bench.cli import main
from lsr.bench.data import FLOOR_GEMM, FWD_BWD, Case, load
from lsr.bench.report import head as head_report
from lsr.bench.report.summary import format_run_table, write_summary
from lsr.heads import HEAD_REGISTRY

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
SLOW = {impl.name for impl in HEAD_REGISTRY.values() if impl.compiles}  # each shape compiles


def head_problem(dtype=torch.float32, tokens=40, hidden=24, vocab=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 2 / hidden**0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    y[::7] = -100
    return h, w, y


def loss_and_grads(fn, h, w, y, smoothing, reduction="mean"):
    h, w = (t.detach().clone().requires_grad_(True) for t in (h, w))
    loss = fn(h, w, y, smoothing, reduction, -100)
    d_hidden, d_weight = torch.autograd.grad(loss.sum(), (h, w))
    return loss.detach().double(), d_hidden.double(), d_weight.double()


def assert_matches_reference(impl, h, w, y, smoothing, tol, reduction="mean"):
    got = loss_and_grads(impl.loss, h, w, y, smoothing, reduction)
    want = loss_and_grads(impl.reference, h.double(), w.double(), y, smoothing, reduction)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * (b.abs().max().item() + 1e-3))


def runs_here() -> list[str]:
    return [impl.name for impl in lsr.heads.available("cpu")]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", runs_here())
def test_every_head_loss_that_runs_here_matches_the_float64_definition(name, smoothing):
    impl = lsr.heads.get(name)
    if impl.unsupported(smoothing=smoothing):
        pytest.skip(impl.unsupported(smoothing=smoothing))
    h, w, y = head_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lsr.heads.TorchFellBack)
        assert_matches_reference(impl, h, w, y, smoothing, TOLERANCE[torch.float32])


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("name", [n for n in runs_here() if n not in SLOW])
def test_the_other_reductions_match_too(name, reduction):
    impl = lsr.heads.get(name)
    h, w, y = head_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lsr.heads.TorchFellBack)
        assert_matches_reference(impl, h, w, y, 0.1, TOLERANCE[torch.float32], reduction)


def test_sparselsr_is_below_exact_smoothing_row_by_row():
    """Jensen: equation 15's non-target term is at most the exact one's, so L_sparse <= L_exact on
    every row; the seed snippet's sign error (adding the term) breaks it."""
    h, w, y = head_problem(tokens=64)
    exact = lsr.heads.get("head-exact").loss(h, w, y, 0.3, "none", -100)
    sparse = lsr.heads.get("head-sparse").loss(h, w, y, 0.3, "none", -100)
    valid = y != -100
    assert (sparse[valid] <= exact[valid] + 1e-6).all()
    assert (sparse[valid] < exact[valid] - 1e-3).any()  # not equal: another function


@pytest.mark.skipif(
    not (TRITON_INTERPRETER and importlib.util.find_spec("liger_kernel")),
    reason="needs Liger-Kernel, Triton and TRITON_INTERPRET=1 before Triton is imported",
)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_liger_fused_linear_cross_entropy_under_the_interpreter(smoothing):
    h, w, y = head_problem(tokens=24, vocab=131)
    assert_matches_reference(lsr.heads.get("liger-flce"), h, w, y, smoothing, TOLERANCE[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Cut Cross-Entropy's kernels need CUDA")
@pytest.mark.parametrize("name", ["cce", "liger-flce", "head-exact"])
def test_the_cuda_head_losses_match_the_float64_definition(name):
    impl = lsr.heads.get(name)
    if not impl.runs_on("cuda"):
        pytest.skip(f"{name} is not available here")
    h, w, y = (t.cuda() for t in head_problem())
    assert_matches_reference(impl, h, w, y, 0.0, TOLERANCE[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_our_head_on_cuda_never_synchronises_with_the_host(reduction):
    h, w, y = (t.cuda() for t in head_problem(tokens=256, vocab=1000))
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lsr.linear_label_smoothing(h, w, y, 0.1, reduction=reduction, chunk_rows=100)
        loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_what_each_refuses_is_said():
    assert lsr.heads.get("cce").unsupported(smoothing=0.1) == "cce has no label smoothing (smoothing 0 only)"
    assert lsr.heads.get("cce").unsupported(smoothing=0.0) is None
    assert "float64" in lsr.heads.get("liger-flce").unsupported(dtype="float64")
    assert not lsr.heads.get("liger-flce").runs_on("cpu")
    assert lsr.heads.get("head-exact").runs_on("cpu")
    with pytest.raises(KeyError, match="unknown head loss 'nope'"):
        lsr.heads.get("nope")
    with pytest.raises(ValueError, match="Cut Cross-Entropy has no label smoothing"):
        lsr.heads._cce(*head_problem(), 0.1)


def test_torch_chunked_path_says_it_fell_back_at_smoothing():
    h, w, y = head_problem()
    with pytest.warns(lsr.heads.TorchFellBack, match="label_smoothing"):
        lsr.heads.get("torch-linear-ce-chunked").loss(h, w, y, 0.1)


def test_the_suites_profile_names_every_head_loss():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from asv_suite.profiles import HEAD_IMPLEMENTATIONS

    assert set(HEAD_REGISTRY) <= set(HEAD_IMPLEMENTATIONS)


# --- the benchmark: gate, cases, statuses ------------------------------------------------------------


def head_case(name, smoothing=0.1, dtype="float32", tokens=96, hidden=32, vocab=500, pass_=FWD_BWD):
    return Case(name, "cpu", dtype, tokens, vocab, smoothing, pass_, threads=1, hidden=hidden)


def test_the_gate_passes_a_right_head_loss_and_fails_a_wrong_one():
    case = head_case("head-exact")
    problem = measure.HeadProblem.make(case)
    impl = lsr.heads.get("head-exact")
    assert measure.check_head_against_reference(case, problem, impl) < 1e-4

    def ignores_smoothing(h, w, y, smoothing, reduction, ignore_index):
        return impl.loss(h, w, y, 0.0, reduction, ignore_index)

    with pytest.raises(measure.GateFailure, match="disagrees with the float64 reference: loss error"):
        measure.check_head_against_reference(case, problem, impl, ignores_smoothing)


def test_the_gate_checks_the_shape_that_is_timed():
    """A loss right on the first HEAD_GATE_TOKENS tokens and wrong on more (as code compiled or
    chunked per shape can be) fails at the timed shape."""
    case = head_case("head-exact", tokens=measure.HEAD_GATE_TOKENS + 64)
    problem = measure.HeadProblem.make(case)
    impl = lsr.heads.get("head-exact")
    assert measure.check_head_against_reference(case, problem, impl) < 1e-4

    def wrong_when_large(h, w, y, smoothing, reduction, ignore_index):
        large = h.shape[0] > measure.HEAD_GATE_TOKENS
        return impl.loss(h, w, y, 0.0 if large else smoothing, reduction, ignore_index)

    with pytest.raises(measure.GateFailure, match="d_hidden at the timed shape error"):
        measure.check_head_against_reference(case, problem, impl, wrong_when_large)


def test_the_head_problem_has_logits_of_the_asked_spread():
    case = head_case("head-exact", tokens=256, hidden=64, vocab=2000)
    problem = measure.HeadProblem.make(case, logit_std=2.0)
    logits = problem.hidden.detach() @ problem.lm_weight.detach().t()
    assert 1.8 < float(logits.std()) < 2.2  # not sqrt(H): no softmax of denormals
    assert problem.hidden.requires_grad and problem.lm_weight.requires_grad


def test_a_head_grid_records_every_loss_with_a_status_and_the_floor_first():
    grid = sweep.HeadGrid(list(HEAD_REGISTRY), ["cpu"], ["float32"], [64], [16], [300], threads=(1,))
    cases = sweep.cases_of([grid])
    assert cases[0].implementation == FLOOR_GEMM and cases[0].hidden == 16
    assert {c.implementation for c in cases} == {FLOOR_GEMM, *HEAD_REGISTRY}
    fast = [c for c in cases if c.implementation not in SLOW]
    measured = sweep.measure_cases(fast, 2.0, 0.01, {}, copy_bandwidths={"cpu": 1e10})
    rows = {(r["implementation"], r["smoothing"]): r for r in measured}
    assert rows[FLOOR_GEMM, 0.0]["status"] == "ok" and rows[FLOOR_GEMM, 0.0]["hidden"] == 16
    assert rows["head-exact", 0.1]["status"] == "ok" and rows["head-exact", 0.1]["max_rel_error"] < 1e-4
    assert rows["head-exact", 0.1]["peak_bytes"] > 0
    assert rows["liger-flce", 0.1]["status"] == "not-available"
    assert rows["cce", 0.1]["status"] == "not-available"
    assert rows["head-exact", 0.1]["bandwidth_bytes_per_s"] is None  # a head need not move its logits
    assert rows["head-exact", 0.1]["bandwidth_fraction"] is None
    assert "torch fell back to its materialising path" in rows["torch-linear-ce-chunked", 0.1]["message"]
    assert "fell back" not in rows["torch-linear-ce-chunked", 0.0]["message"]
    if lsr.heads.get("cce-torch-compile").runs_on("cpu"):
        cases = [c for c in cases if c.implementation == "cce-torch-compile" and c.smoothing == 0.1]
        (row,) = sweep.measure_cases(cases, 2.0, 0.01, {})
        assert (row["status"], row["message"]) == (
            "unsupported",
            "cce-torch-compile has no label smoothing (smoothing 0 only)",
        )


def test_a_non_repeatable_backward_is_recorded_unsupported():
    case = head_case("torch-linear-ce-chunked", pass_="backward")
    assert sweep.refusal(case)["status"] == "unsupported"
    assert sweep.refusal(head_case("materialised", pass_="backward")) is None


def test_the_command_line_runs_a_head_sweep_and_reports_it(tmp_path, capsys):
    out = tmp_path / "head"
    args = [
        "run",
        "--preset",
        "head-dry-run",
        "--dtype",
        "float32",
        "--batch",
        "32",
        "64",
        "--classes",
        "200",
    ]
    args += ["--hidden", "16", "--impl", "head-exact", "head-sparse", "materialised", "liger-flce"]
    assert main([*args, "--out", str(out), "--min-time", "0.01", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "LM head, smoothing > 0" in printed and "floor-gemm" in printed
    rows, _ = load(out / "cpu")
    assert {r["hidden"] for r in rows} == {16}
    assert {r["implementation"] for r in rows} == {
        FLOOR_GEMM,
        "head-exact",
        "head-sparse",
        "materialised",
        "liger-flce",
    }
    chart = out / "cpu" / head_report.head_chart_file("float32", 16, 200)
    assert chart.exists()
    summary = (out / "README.md").read_text()
    assert "### LM head losses" in summary and chart.name in summary
    assert "liger-flce does not run on cpu here" in summary  # the reason, not just a missing row
    header = format_run_table(rows).splitlines()[0].split()
    assert header[:7] == ["implementation", "device", "dtype", "N", "C", "H", "pass"]
    with open(out / "cpu" / "results.csv") as f:
        assert "hidden" in next(csv.reader(f))
    write_summary(out)  # again, from the files alone


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "head-dry-run", "--impl", "native"], "not head losses"),
        (["--preset", "quick", "--impl", "head-exact"], "head losses, measured by --preset head"),
        (["--preset", "quick", "--hidden", "64"], "--hidden is an axis of the head presets"),
        (["--preset", "head-dry-run", "--weighted", "on"], "axes of the logits losses, not of --preset head"),
    ],
)
def test_the_command_line_refuses_mixing_head_and_logits_losses(tmp_path, capsys, args, words):
    assert main(["run", *args, "--out", str(tmp_path)]) == 2
    assert words in capsys.readouterr().err


# --- the choice ---------------------------------------------------------------------------------------


def row(name, ms, mib, status="ok", smoothing=0.1):
    return {
        "implementation": name,
        "device": "cpu",
        "dtype": "float32",
        "batch": 2048,
        "hidden": 256,
        "classes": 32000,
        "smoothing": smoothing,
        "pass": FWD_BWD,
        "threads": 2,
        "status": status,
        "median_s": ms / 1e3,
        "iqr_s": 0.0,
        "peak_bytes": mib * 2**20,
        "message": "",
        "busy": False,
    }


def test_ours_is_chosen_only_with_the_lowest_peak_and_the_fastest_within_twice_it():
    of = {r["implementation"]: r for r in [row("head-exact", 500, 100), row("materialised", 400, 900)]}
    assert head_report.head_choice(of)["verdict"] == "yes"  # materialised is faster but 9x the peak
    of["compiled-autochunk"] = row("compiled-autochunk", 450, 150)
    choice = head_report.head_choice(of)
    assert (
        choice["verdict"]
        == "no: compiled-autochunk is faster within 2x of the lowest peak (450 against 500 ms)"
    )
    of["cce"] = row("cce", 300, 50)
    assert head_report.head_choice(of)["verdict"].startswith("no: cce has a lower peak (50 against 100 MiB)")
    of["head-sparse"] = row("head-sparse", 10, 1)  # another function: never in the choice
    assert head_report.head_choice(of)["lowest"]["implementation"] == "cce"
    of["cce"]["status"] = "failed"  # the gate rejected it: out of the choice
    assert head_report.head_choice(of)["lowest"]["implementation"] == "head-exact"


def test_the_chart_names_a_point_lost_at_one_size():
    rows = [
        row(name, ms, mib, smoothing=0.1) | {"batch": n, "threads": 2}
        for name, ms, mib in ((FLOOR_GEMM, 300, 100), ("head-exact", 320, 50), ("materialised", 500, 400))
        for n in (512, 2048)
    ]
    rows[-1] = rows[-1] | {"status": "oom", "median_s": None, "peak_bytes": None}  # materialised at 2048
    fig = head_report.head_figure(rows, {}, "float32", 256, 32000)
    assert "materialised (oom at N 2048)" in fig.axes[0].get_xlabel()
