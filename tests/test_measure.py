"""The field in one harness: two floors, bandwidth, first calls, machine facts, padding and class weights."""

import dataclasses
import gc
import time

import pytest
import torch

import lsr
from lsr.bench import environment, grid, measure, results
from lsr.bench.gate import GateFailure, check_against_reference, mean_denominator
from lsr.bench.grid import Grid, cases_of
from lsr.bench.results import FLOOR, FLOOR_ALLOC, FLOORS, IGNORE_INDEX, Case, floor_for
from lsr.bench.runner import run_sweep

FAST = dict(min_time=0.001, progress=False)
PADDED = dict(ignore_fraction=0.3, weighted=True)  # a padding-heavy batch with class weights


def padded_case(name: str, batch: int = 64, classes: int = 50, **axes) -> Case:
    """A forward+backward case with as much of PADDED as `name` takes."""
    impl = lsr.get(name)
    axes = {"ignore_fraction": 0.3 if impl.supports_ignore_index else 0.0, "weighted": impl.supports_weight}
    return Case(name, "cpu", "float32", batch, classes, 0.1, "forward+backward", **axes)


# --- A. two floors ------------------------------------------------------------------------------------


def test_both_floors_come_first_once_per_size_whatever_the_new_axes():
    g = Grid(
        ["native", "sparse"],
        ["cpu"],
        ["float32"],
        [4, 8],
        [3],
        smoothings=(0.0, 0.1),
        **{
            "ignore_fractions": (0.0, 0.3),
            "weighted": (False, True),
        },
    )
    cases = list(g.cases())
    for batch in (4, 8):
        size = [c for c in cases if c.batch == batch]
        assert [c.implementation for c in size[:2]] == list(FLOORS) == [FLOOR, FLOOR_ALLOC]
        assert all(c.ignore_fraction == 0.0 and not c.weighted and c.smoothing == 0.0 for c in size[:2])
        assert not any(c.is_floor for c in size[2:])
    native = [c for c in cases if c.implementation == "native"]
    assert len(native) == 2 * 2 * 2 * 2 * 3  # sizes x smoothings x ignore fractions x weighting x passes
    assert not [c for c in cases if c.implementation == "sparse" and c.weighted]  # it takes no weights
    assert g.as_dict()["ignore_fractions"] == [0.0, 0.3] and g.as_dict()["weighted"] == [False, True]


def test_floor_writes_one_buffer_and_floor_alloc_a_new_tensor_every_call():
    problem = measure.Problem.make(Case(FLOOR, "cpu", "float32", 8, 5, 0.1, "forward+backward"))
    kept, fresh = (
        measure.Pass(Case(name, "cpu", "float32", 8, 5, 0.1, "forward+backward"), problem, None)
        for name in FLOORS
    )
    a, b = kept(), kept()
    assert a.data_ptr() == b.data_ptr()
    first = fresh()
    second = fresh()
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, torch.exp(problem.logits.detach()))
    assert measure.peak_bytes(fresh, torch.device("cpu")) == 8 * 5 * 4  # the new tensor, counted
    assert measure.peak_bytes(kept, torch.device("cpu")) == 0


def test_floor_for_names_an_implementations_floor():
    assert floor_for("fused-exact-inplace") == FLOOR and floor_for("native") == FLOOR_ALLOC
    assert floor_for(lsr.get("fused-exact-inplace")) == FLOOR and floor_for(lsr.get("dense")) == FLOOR_ALLOC
    assert [floor_for(name) for name in FLOORS] == list(FLOORS)
    assert floor_for("not-registered") == FLOOR_ALLOC
    for impl in lsr.REGISTRY.values():
        assert floor_for(impl.name) == (FLOOR if impl.inplace_backward else FLOOR_ALLOC)


# --- B, C. bandwidth and first calls ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::lsr.bench.runner.BusyMachineWarning")
def test_bandwidth_is_the_least_traffic_over_the_median_and_a_fraction_of_a_copy(tmp_path):
    cases = [Case(name, "cpu", "float32", 4096, 4096, 0.1, "forward+backward") for name in FLOORS]  # 64 MiB
    cases += [Case("native", "cpu", "float32", 16, 10, 0.1, p) for p in ("forward", "forward+backward")]
    environment._copy_bandwidth.cache_clear()  # measured by this sweep, not under an earlier test's load
    rows = run_sweep(cases, tmp_path, **FAST)
    copy = results.read_metadata(tmp_path)["copy_bandwidth_bytes_per_s"]["cpu"]
    assert copy == environment.copy_bandwidth("cpu") > 1e8  # measured once in this process
    for row in rows:
        assert row["status"] == "ok"
        if row["pass"] != "forward+backward":
            assert row["bandwidth_bytes_per_s"] is None and row["bandwidth_fraction"] is None
            continue
        assert row["bandwidth_bytes_per_s"] == pytest.approx(2 * row["logits_bytes"] / row["median_s"])
        assert row["bandwidth_fraction"] == pytest.approx(row["bandwidth_bytes_per_s"] / copy)
    for row in rows[:2]:  # beyond the caches: a floor moves its bytes at most about as fast as a copy
        assert 0 < row["bandwidth_fraction"] <= 1.5, row
    assert results.read_rows(tmp_path) == rows


def test_time_pass_keeps_the_first_call_apart():
    calls = []

    def slow_first():
        calls.append(1)
        time.sleep(0.05 if len(calls) == 1 else 0.0)

    timing = measure.time_pass(slow_first, min_time=0.001, min_samples=3)
    assert timing.first_call_s >= 0.05 > timing.median
    calls.clear()
    timing = measure.time_pass(slow_first, min_time=0.001, min_samples=3, first_call_s=1.5)
    assert timing.first_call_s == 1.5 and calls and sum(calls) == timing.runs + 1  # no call made for it


def test_rows_record_the_first_call_and_a_failed_row_none(tmp_path):
    def wrong(input, target, smoothing, reduction="mean", ignore_index=-100):
        return lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index) * 1.1

    cases = list(Grid(["native", "dense"], ["cpu"], ["float32"], [8], [5]).cases())
    rows = run_sweep(cases, tmp_path, loss_fns={"dense": wrong}, **FAST)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["first_call_s"] >= 0 for r in ok)
    assert {r["status"] for r in rows if r["implementation"] == "dense"} == {"failed"}
    assert all(r["first_call_s"] is None for r in rows if r["status"] == "failed")


# --- D. machine facts ---------------------------------------------------------------------------------


def fake_sysfs(root, caches):
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(f"{value}\n")
    return root


def test_cache_sizes_are_read_from_sysfs(tmp_path):
    epyc = [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"), (3, "Unified", "32768K")]
    root = fake_sysfs(tmp_path / "cpu0", epyc)
    assert environment.cache_bytes(root) == {"L1d": 32768, "L2": 524288, "L3": 32 * 2**20}
    no_l3 = fake_sysfs(tmp_path / "small", [(1, "Data", "48K"), (2, "Unified", "2M")])
    assert environment.cache_bytes(no_l3) == {"L1d": 48 * 1024, "L2": 2 * 2**20, "L3": None}
    for text, size in (("32K", 32768), ("1M", 2**20), ("32 KiB", 32768), ("524288\n", 524288), ("?", None)):
        assert environment._size_bytes(text) == size


def test_cache_sizes_are_none_where_nothing_says(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "_lscpu_caches", dict)
    monkeypatch.setattr(environment, "_sysctl_caches", dict)
    assert environment.cache_bytes(tmp_path) == {"L1d": None, "L2": None, "L3": None}


def test_environment_has_the_facts_that_decide_a_cpus_ratios():
    facts = environment.environment("cpu")
    assert facts["vector_isa"] and set(facts["cache_bytes"]) == {"L1d", "L2", "L3"}
    assert facts["copy_bandwidth_bytes_per_s"] == {"cpu": environment.copy_bandwidth("cpu")}


# --- E. padding and class weights ----------------------------------------------------------------------


def test_problem_ignores_a_fraction_of_targets_and_weighs_classes_with_a_fixed_seed():
    plain = measure.Problem.make(Case("native", "cpu", "float32", 100, 7, 0.1, "forward"))
    padded = measure.Problem.make(Case("native", "cpu", "float32", 100, 7, 0.1, "forward", **PADDED))
    again = measure.Problem.make(Case("native", "cpu", "float32", 100, 7, 0.1, "forward", **PADDED))
    ignored = padded.target == IGNORE_INDEX
    assert int(ignored.sum()) == 30 and torch.equal(padded.target[~ignored], plain.target[~ignored])
    assert torch.equal(padded.logits, plain.logits) and plain.weight is None
    assert padded.weight.shape == (7,) and bool((padded.weight > 0).all())
    assert torch.equal(padded.weight, again.weight) and torch.equal(padded.target, again.target)
    assert padded.options == {"ignore_index": IGNORE_INDEX, "weight": padded.weight}
    assert mean_denominator(padded.target, None) == 70
    assert mean_denominator(padded.target, padded.weight) == pytest.approx(
        float(padded.weight[padded.target[~ignored]].sum())
    )


def test_the_timed_pass_gets_the_weights_and_the_ignore_index():
    seen = {}

    def spy(input, target, smoothing, reduction="mean", ignore_index=-100, **options):
        seen.update(options, ignore_index=ignore_index, ignored=int((target == ignore_index).sum()))
        return lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index, **options)

    case = Case("native", "cpu", "float32", 10, 4, 0.1, "forward", **PADDED)
    problem = measure.Problem.make(case)
    measure.Pass(case, problem, lsr.get("native"), spy)()
    assert seen["weight"] is problem.weight and seen["ignore_index"] == IGNORE_INDEX and seen["ignored"] == 3


@pytest.mark.parametrize(
    "name", ["native", "dense", "sparse", "fused-exact", "fused-sparse", "fused-exact-inplace"]
)
def test_the_gate_passes_implementations_on_padded_weighted_batches(name):
    case = padded_case(name)
    assert case.ignore_fraction == 0.3 and case.weighted == lsr.get(name).supports_weight
    assert check_against_reference(case, measure.Problem.make(case), lsr.get(name)) < 1e-4


def divide_by_the_batch(input, target, smoothing, reduction="mean", ignore_index=-100, weight=None):
    """Averages over every row, ignored ones included: right only without padding and weights."""
    summed = "sum" if reduction == "mean" else reduction
    loss = lsr.native_label_smoothing(input, target, smoothing, summed, ignore_index, weight=weight)
    return loss / input.shape[0] if reduction == "mean" else loss


def drop_the_weights(input, target, smoothing, reduction="mean", ignore_index=-100, weight=None):
    return lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index)


def count_ignored_rows(input, target, smoothing, reduction="mean", ignore_index=-100, weight=None):
    """Treats ignored rows as targets of class 0."""
    target = torch.where(target == ignore_index, torch.zeros_like(target), target)
    return lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index, weight=weight)


@pytest.mark.parametrize("wrong", [divide_by_the_batch, drop_the_weights, count_ignored_rows])
def test_the_gate_fails_wrong_implementations_on_padded_weighted_batches(wrong):
    case = padded_case("native")
    problem = measure.Problem.make(case)
    with pytest.raises(GateFailure, match="float64 reference"):
        check_against_reference(case, problem, lsr.get("native"), wrong)
    plain = Case("native", "cpu", "float32", 64, 50, 0.1, "forward+backward")  # the bug does not show here
    assert check_against_reference(plain, measure.Problem.make(plain), lsr.get("native"), wrong) < 1e-4


def garbage_in_forward(input, target, smoothing, reduction="mean", ignore_index=-100, weight=None):
    """As Liger-Kernel's forward: the loss is computed, then the logits are overwritten (here with garbage)."""
    loss = lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index, weight=weight)
    with torch.no_grad():
        input.copy_(torch.randn_like(input) * 100)
    return loss


def test_the_gate_gives_a_loss_that_overwrites_its_logits_in_forward_fresh_copies():
    case = padded_case("native")
    problem = measure.Problem.make(case)
    before = problem.logits.detach().clone()
    says_so = dataclasses.replace(lsr.get("native"), inplace_backward=True)
    assert check_against_reference(case, problem, says_so, garbage_in_forward) < 1e-4
    assert torch.equal(problem.logits.detach(), before)  # every call had a copy of its own
    with pytest.raises(GateFailure):  # without the flag, its calls share the logits: the second sees garbage
        check_against_reference(case, problem, lsr.get("native"), garbage_in_forward)


def test_implementations_without_weights_or_ignore_index_are_unsupported_there(tmp_path, monkeypatch):
    no_ignore = dataclasses.replace(lsr.get("dense"), supports_ignore_index=False)
    monkeypatch.setitem(lsr.REGISTRY, "dense", no_ignore)
    cases = [
        Case("sparse", "cpu", "float32", 8, 5, 0.1, "forward+backward", weighted=True),
        Case("dense", "cpu", "float32", 8, 5, 0.1, "forward+backward", ignore_fraction=0.3),
        Case("dense", "cpu", "float32", 8, 5, 0.1, "forward+backward", weighted=True),
    ]
    rows = run_sweep(cases, tmp_path, **FAST)
    assert [r["status"] for r in rows] == ["unsupported", "unsupported", "ok"]
    assert rows[0]["message"] == "sparse takes no class weights" and "ignore_index" in rows[1]["message"]
    assert not [
        c
        for c in Grid(["dense"], ["cpu"], ["float32"], [8], [5], ignore_fractions=[0.3]).cases()
        if not c.is_floor
    ]


def test_a_sweep_over_the_new_axes_is_gated_timed_and_read_back(tmp_path):
    g = grid.field("cpu", ["float32"], 16, 10)
    g = dataclasses.replace(g, implementations=["native", "sparse", "fused-exact-inplace"])
    rows = run_sweep(g.cases(), tmp_path, **FAST)
    assert all(r["status"] == "ok" for r in rows), [r["message"] for r in rows if r["status"] != "ok"]
    assert {(r["ignore_fraction"], r["weighted"]) for r in rows} == {
        (0.0, False),
        (0.3, False),
        (0.0, True),
        (0.3, True),
    }
    assert results.read_rows(tmp_path) == rows
    assert gc.get_freeze_count() == 0  # the sweep froze survivors between cases, and thawed them


# --- the presets --------------------------------------------------------------------------------------


def test_presets_sweep_each_case_once_with_the_new_axes_on_one_size():
    for name in grid.PRESETS:
        cases = cases_of(grid.preset_grids(name, "cpu"))
        assert len(cases) == len(set(cases))
        floors = [c for c in cases if c.is_floor]
        sizes = {(c.dtype, c.batch, c.classes) for c in cases}
        assert len(floors) == 2 * len(sizes)
        padded = {(c.dtype, c.batch, c.classes) for c in cases if c.ignore_fraction or c.weighted}
        assert len({size[1:] for size in padded}) == 1  # one size has the padding and weight axes
        assert {c.smoothing for c in cases} == {0.0, 0.1} and "bfloat16" in {c.dtype for c in cases}
    quick = cases_of(grid.preset_grids("quick", "cpu"))
    assert len(quick) < 250  # a few minutes on 2 cores
    assert grid.preset("quick", ["cpu", "mps"]) == [
        *grid.preset_grids("quick", "cpu"),
        *grid.preset_grids("quick", "mps"),
    ]


def test_cases_of_keeps_each_inputs_cases_together():
    a = Grid(["native"], ["cpu"], ["float32"], [4, 8], [3], passes=["forward"])
    b = Grid(["native"], ["cpu"], ["float32"], [4], [3], [0.0], ["forward"], weighted=[True, False])
    cases = cases_of([a, b, a])
    assert [(c.batch, c.implementation, c.smoothing, c.weighted) for c in cases] == [
        (4, FLOOR, 0.1, False),  # once a size, under the first grid's smoothing
        (4, FLOOR_ALLOC, 0.1, False),
        (4, "native", 0.1, False),
        (4, "native", 0.0, False),  # with the other unweighted case of its size: one set of inputs
        (4, "native", 0.0, True),
        (8, FLOOR, 0.1, False),
        (8, FLOOR_ALLOC, 0.1, False),
        (8, "native", 0.1, False),
    ]
