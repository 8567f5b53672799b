"""The measure layer: the inputs and the timed pass (two floors, padding and class weights, per-call
preparation), timing (first calls, CUDA events on CPU), the memory meters and estimates, the
correctness gate, and the machine's facts."""

import dataclasses
import gc
import statistics
import time

import pytest
import torch

import lsr
from helpers import FAST, eager_grid, wrong_smoothing
from lsr.bench import data as results
from lsr.bench import measure
from lsr.bench.data import (
    FLOOR,
    FLOOR_ALLOC,
    FLOORS,
    IGNORE_INDEX,
    Case,
)
from lsr.bench.measure import machine as environment
from lsr.bench.measure import timing as timing_module
from lsr.bench.measure.gate import GateFailure, check_against_reference, mean_denominator
from lsr.bench.sweep import grid
from lsr.bench.sweep.grid import Grid, cases_of
from lsr.bench.sweep.runner import (
    run_sweep,
)

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
        measure.TimedPass(Case(name, "cpu", "float32", 8, 5, 0.1, "forward+backward"), problem, None)
        for name in FLOORS
    )
    a, b = kept(), kept()
    assert a.data_ptr() == b.data_ptr()
    first = fresh()
    second = fresh()
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, torch.exp(problem.logits.detach()))
    assert measure.peak_bytes(fresh, torch.device("cpu")) == 8 * 5 * 4  # the new tensor, counted
    assert measure.peak_bytes(kept, torch.device("cpu")) == 0


# --- B, C. bandwidth and first calls ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::lsr.bench.sweep.runner.BusyMachineWarning")
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
    measure.TimedPass(case, problem, lsr.get("native"), spy)()
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


@pytest.mark.parametrize("flag", ["inplace_backward", "gradient_in_forward"])
def test_the_gate_gives_a_loss_that_overwrites_its_logits_in_forward_fresh_copies(flag):
    case = padded_case("native")
    problem = measure.Problem.make(case)
    before = problem.logits.detach().clone()
    says_so = dataclasses.replace(lsr.get("native"), **{flag: True})
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
        sizes = {(c.dtype, c.batch, c.classes, c.hidden, c.threads) for c in cases}
        if name.startswith("head"):  # the LM head presets: floor-gemm alone, per size
            assert all(c.is_head for c in cases) and len(floors) == len(sizes)
            assert {c.smoothing for c in cases} == {0.0, 0.1}
            continue
        assert len(floors) == 2 * len(sizes)
        padded = {(c.dtype, c.batch, c.classes) for c in cases if c.ignore_fraction or c.weighted}
        assert len({size[1:] for size in padded}) == 1  # one size has the padding and weight axes
        assert {c.threads for c in cases if c.threads != torch.get_num_threads()} <= {1}
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


# --- F. per-call preparation, CUDA timing (its plumbing, on CPU), device inputs ------------------------


def test_cpu_inputs_are_those_of_the_host_generator_as_before():
    """The committed CPU results were measured on these exact draws: logits, targets, ignored rows, weights."""
    case = Case("native", "cpu", "bfloat16", 20, 6, 0.1, "forward", **PADDED)
    problem = measure.Problem.make(case, logit_std=3.0, seed=4)
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(20, 6, generator=gen) * 3.0).to(torch.bfloat16)
    target = torch.randint(0, 6, (20,), generator=gen)
    target[torch.randperm(20, generator=gen)[:6]] = IGNORE_INDEX
    weight = torch.rand(6, generator=gen) + 0.5
    assert torch.equal(problem.logits.detach(), logits) and problem.logits.requires_grad
    assert torch.equal(problem.target, target) and torch.equal(problem.weight, weight)


def overwrite_after_checking(seen: list):
    """A loss that writes garbage over its logits in forward (as the one-pass mode writes its
    gradient), after noting whether it was given the problem's pristine logits."""

    def loss(input, target, smoothing, reduction="mean", ignore_index=-100, weight=None):
        seen.append(input)
        value = lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index, weight=weight)
        with torch.no_grad():
            input.copy_(torch.randn_like(input) * 100)
        return value

    return loss


def test_a_gradient_in_forward_pass_gets_fresh_logits_before_every_timed_and_metered_call():
    case = padded_case("native")
    problem = measure.Problem.make(case)
    pristine = problem.logits.detach().clone()
    one_pass = dataclasses.replace(lsr.get("native"), gradient_in_forward=True)
    seen, fresh = [], []
    loss = overwrite_after_checking(seen)

    def checked(input, *args, **kwargs):
        fresh.append(torch.equal(input.detach(), pristine) and not input.is_leaf)
        return loss(input, *args, **kwargs)

    timed = measure.TimedPass(case, problem, one_pass, checked)
    assert timed.prepares
    timing = measure.time_pass(timed, min_time=0.001, min_samples=5)
    assert timing.runs_per_sample == 1 and timing.timer == measure.PERF_COUNTER
    measure.peak_bytes(timed, timed.device)
    measure.peak_rss_bytes(timed)
    assert len(fresh) == timing.runs + 2 + 2 and all(fresh)  # 2 warm-up calls, 2 meters
    assert torch.equal(problem.logits.detach(), pristine)  # the problem's own logits are never written


def test_ordinary_and_inplace_passes_on_cpu_need_no_preparation_and_keep_the_host_clock():
    case = Case("fused-exact-inplace", "cpu", "float32", 4, 5, 0.1, "forward+backward")
    problem = measure.Problem.make(case)
    for name in ("native", "fused-exact-inplace"):
        timed = measure.TimedPass(dataclasses.replace(case, implementation=name), problem, lsr.get(name))
        assert not timed.prepares
        timing = measure.time_pass(timed, min_time=0.001, min_samples=3)
        assert timing.timer == "perf_counter"
        assert timing.row_fields()["wall_median_s"] is None and timing.row_fields()["host_s"] is None


def test_a_measurement_fills_the_results_timing_columns():
    fields = measure.Measurement(
        (1.0, 2.0), 1, 2, 0.5, "cuda-events", (2.0, 4.0, 3.0), (0.1, 0.3)
    ).row_fields()
    assert set(fields) <= set(results.COLUMN_TYPES)
    assert fields == {
        "median_s": 1.5,
        "iqr_s": 0.5,
        "runs": 2,
        "threads": 2,
        "first_call_s": 0.5,
        "timer": "cuda-events",
        "wall_median_s": 3.0,
        "host_s": 0.2,
    }


class FakeEvent:
    """torch.cuda.Event's timing interface on the host clock, each record logged."""

    def __init__(self, log, enable_timing=False):
        assert enable_timing
        self.log = log

    def record(self, stream=None):
        self.time = time.perf_counter()
        self.log.append(("record", self))

    def elapsed_time(self, end) -> float:
        return (end.time - self.time) * 1e3


def test_cuda_timing_brackets_each_call_alone_with_the_flush_and_fresh_logits_outside(monkeypatch):
    """time_on_cuda's plumbing with the device faked on CPU: events, L2 flush, host and wall times."""
    log = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: FakeEvent(log, **kwargs))
    for module in (timing_module, measure.problem):  # where the timed pass and the clocks synchronise
        monkeypatch.setattr(module, "synchronize", lambda device: log.append(("sync",)))

    class Flush:
        def __init__(self, device):
            assert device.type == "cuda"

        def __call__(self):
            log.append(("flush",))

    monkeypatch.setattr(timing_module, "L2Flush", Flush)
    case = padded_case("native")
    problem = measure.Problem.make(case)
    seen = []
    one_pass = dataclasses.replace(lsr.get("native"), gradient_in_forward=True)
    timed = measure.TimedPass(case, problem, one_pass, overwrite_after_checking(seen))
    timed.device = torch.device("cuda")  # as a CUDA pass: timed with events

    def enqueued(original=timed.enqueue):
        log.append(("call", timed.problem.logits))
        return original()

    def prepared(original=timed.prepare):
        log.append(("prepare",))
        return original()

    timed.enqueue, timed.prepare = enqueued, prepared
    timing = measure.time_pass(timed, min_time=0.001, min_samples=5)
    assert timing.timer == "cuda-events" and timing.runs_per_sample == 1
    assert len(timing.host_samples) == len(timing.samples) >= 5 and len(timing.wall_samples) >= 3
    assert all(0 <= h for h in timing.host_samples) and timing.host_median <= timing.median
    # Between each start and end event: one call and nothing else (no flush, no synchronisation);
    # before each start: a flush, after the call's fresh logits were made.
    kinds = [entry[0] for entry in log]
    starts = [i for i, kind in enumerate(kinds) if kind == "record"][::2]
    assert len(starts) == len(timing.samples)
    for i in starts:
        assert kinds[i - 1 : i + 3] == ["flush", "record", "call", "record"]
    assert kinds.count("prepare") == kinds.count("flush")  # once a call, timed or on the wall clock
    fresh_logits = [entry[1] for entry in log if entry[0] == "call"]
    assert len({id(x) for x in fresh_logits}) == len(fresh_logits)  # a new tensor for every call
    assert all(x.grad_fn is not None for x in fresh_logits)


def test_cuda_timing_without_flush_makes_no_flush_buffer(monkeypatch):
    log = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: FakeEvent(log, **kwargs))
    for module in (timing_module, measure.problem):
        monkeypatch.setattr(module, "synchronize", lambda device: None)
    monkeypatch.setattr(timing_module, "L2Flush", None)  # calling it would raise
    case = Case("native", "cpu", "float32", 4, 5, 0.1, "forward")
    timed = measure.TimedPass(case, measure.Problem.make(case), lsr.get("native"))
    timed.device = torch.device("cuda")
    timing = measure.time_pass(timed, min_time=0.001, min_samples=3, l2_flush=False)
    assert timing.timer == "cuda-events" and len(log) == 2 * len(timing.samples) and not timed.prepares


def test_the_peak_estimate_counts_the_one_pass_copies():
    sizes = dict(device="cpu", dtype="bfloat16", batch=1024, classes=1000, smoothing=0.1, pass_="forward")
    logits = 1024 * 1000 * 2
    for name in ("fused-exact-onepass", "fused-sparse-onepass"):
        assert measure.estimated_peak_bytes(Case(name, **sizes)) >= 3 * logits  # inputs, fresh copy, gate's


def test_metadata_names_each_devices_timer():
    facts = environment.environment("cpu")
    assert facts["timer"] == {"cpu": "perf_counter"} and "cuda" not in facts
    assert measure.L2_FLUSH["cuda"] is True  # on by default for CUDA


def test_gpu_presets_cover_both_regimes_and_cpu_presets_are_unchanged():
    full = cases_of(grid.preset_grids("full", "cuda"))
    sizes = {(c.dtype, c.batch, c.classes) for c in full}
    lm = {(d, n, c) for d in ("bfloat16", "float32") for n in grid.LM_BATCHES for c in grid.LM_CLASSES}
    paper = {(d, n, c) for d in ("bfloat16", "float32") for n in (128, 1024) for c in (10, 100, 1000)}
    assert lm | paper <= sizes
    assert {32000, 50257, 128256, 151936, 262144} == set(grid.LM_CLASSES)
    assert full[0].dtype == "bfloat16"  # the targets' dtype first: a run cut short still has them
    assert {c.pass_ for c in full} == {"forward+backward"}
    quick = cases_of(grid.preset_grids("quick", "cuda"))
    assert {c for c in quick if not c.is_floor} < set(full)  # a subset (a floor's smoothing may differ)
    dry = cases_of(grid.preset_grids("gpu-dry-run", "cpu"))
    assert {c.device for c in dry} == {"cpu"} and max(c.batch * c.classes for c in dry) <= 2**18
    # The CPU presets are those of the committed CPU results
    cpu_full = cases_of(grid.preset_grids("full", "cpu"))
    assert {(c.batch, c.classes) for c in cpu_full if c.dtype == "float32"} == {
        (n, c) for n in (256, 1024, 4096) for c in (100, 1000, 10000, 32768)
    }


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


def test_gate_rejects_a_wrong_implementation(tmp_path):
    rows = run_sweep(eager_grid().cases(), tmp_path, loss_fns={"dense": wrong_smoothing}, **FAST)
    dense = [r for r in rows if r["implementation"] == "dense"]
    assert dense and all(r["status"] == "failed" for r in dense)
    assert all(r["median_s"] is None for r in dense)  # a wrong answer is never timed
    assert "float64 reference" in dense[0]["message"]
    assert all(r["status"] == "ok" for r in rows if r["implementation"] != "dense")


def test_gate_checks_the_timed_mean_reduction(tmp_path):
    def wrong_mean(input, target, smoothing, reduction="mean", ignore_index=-100):
        loss = lsr.native_label_smoothing(input, target, smoothing, reduction, ignore_index)
        return loss * 1.01 if reduction == "mean" else loss

    rows = run_sweep(eager_grid().cases(), tmp_path, loss_fns={"sparse": wrong_mean}, **FAST)
    assert {r["status"] for r in rows if r["implementation"] == "sparse"} == {"failed"}


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")
def test_the_gate_reads_no_value_that_requires_grad(impl):
    """An in-place loss returns its logits as the gradient: the gate must detach it before reading."""
    case = Case(impl.name, "cpu", "float32", 16, 10, 0.1, "forward+backward")
    assert measure.check_against_reference(case, measure.Problem.make(case), impl) < 1e-4


def test_a_registered_implementation_has_a_memory_factor():
    """Each states its own (the default, 4, assumes the dense baseline's appetite)."""
    factors = {impl.peak_factor for impl in lsr.REGISTRY.values()}
    assert all(1.0 <= f <= 4.0 for f in factors) and len(factors) > 2
