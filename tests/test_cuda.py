"""CUDA only (skipped elsewhere): the fused losses' compiled Triton kernels where training uses them,
and the benchmark's CUDA measurement. The loss tests run on CUDA too (the `device` fixture).

What is checked here: capture in a CUDA graph, `torch.compile(fullgraph=True)` of a model with the
loss, no host synchronisation on the hot path, more than 2^31 elements, non-contiguous and (N, C, d)
inputs, a non-default stream; device-made benchmark inputs, CUDA-event timing, and the sweep's memory
estimate. Run with TRITON_INTERPRET=0 (benchmarks/gpu/run.sh does): the interpreter would run the
kernels on the host instead.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import lsr
from helpers import TOLERANCE, random_problem
from lsr.bench import measure
from lsr.bench.data import IGNORE_INDEX, Case
from lsr.bench.sweep.runner import run_sweep
from lsr.fused import FusedLSRLoss, fused_label_smoothing, fused_sparse_label_smoothing, triton_available
from lsr.reference import exact_reference, sparse_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not triton_available(), reason="the fused losses need Triton on CUDA"),
]

CUDA = "cuda"
LOSSES = [(fused_label_smoothing, exact_reference), (fused_sparse_label_smoothing, sparse_reference)]
LOSS_IDS = ["exact", "sparse"]


def project_losses_on_cuda() -> list[lsr.Implementation]:
    """The project's fused implementations that run on CUDA here (peers have tests/test_peers.py)."""
    return [impl for impl in lsr.available(CUDA) if impl.fused]


def on_cuda(*tensors):
    return [t.to(CUDA) for t in tensors]


def upstream(shape, seed=1) -> torch.Tensor:
    """A fixed random upstream gradient in [0.5, 1.5), made on the device."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=CUDA, dtype=torch.float64) + 0.5


def loss_and_grad(fn, logits, target, **kwargs):
    """Loss and d(sum(loss * u))/d(logits), on the logits' device; `fn` gets a layer's output."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x * 1, target, **kwargs)
    (out.double() * upstream(out.shape)).sum().backward()
    return out.detach(), x.grad


def assert_agrees(fn, ref, logits, target, **kwargs):
    """`fn` agrees with the float64 `ref` in loss and gradient, within helpers.TOLERANCE."""
    rtol, atol = TOLERANCE[logits.dtype]
    loss, grad = loss_and_grad(fn, logits, target, **kwargs)
    ref_loss, ref_grad = loss_and_grad(ref, logits.double(), target, **kwargs)
    assert loss.dtype == logits.dtype and grad.shape == logits.shape and grad.device.type == CUDA
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


def test_triton_kernels_are_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", (
        "TRITON_INTERPRET=1 runs the Triton kernels on the host: run the CUDA tests with TRITON_INTERPRET=0"
    )


# --- where training runs the loss ---------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "ref"), LOSSES, ids=LOSS_IDS)
def test_capture_in_a_cuda_graph(fn, ref):
    """Forward and backward captured once, replayed on new logits copied into the static input."""
    logits, target = on_cuda(*random_problem((64, 1000), scale=2.0, ignore_fraction=0.2, seed=50))
    new_logits = on_cuda(random_problem((64, 1000), scale=2.0, seed=51)[0])[0]
    x = logits.clone().requires_grad_(True)

    def step():
        loss = fn(x, target, 0.1, "mean", validate_targets=False)
        return loss, torch.autograd.grad(loss, x)[0]

    side = torch.cuda.Stream()  # warm-up (compilation, allocations) on a side stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()
    with torch.no_grad():
        x.copy_(new_logits)
    graph.replay()
    torch.cuda.synchronize()
    z = new_logits.double().requires_grad_(True)
    expected = ref(z, target, 0.1, "mean")
    (expected_grad,) = torch.autograd.grad(expected, z)
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(static_loss.double(), expected.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(static_grad.double(), expected_grad, rtol=rtol, atol=atol)


def test_a_model_with_the_loss_compiles_in_one_graph_and_trains_like_cross_entropy():
    """Linear -> fused loss under torch.compile(fullgraph=True) takes eager F.cross_entropy's SGD steps."""
    torch.manual_seed(0)
    inputs, target = torch.randn(64, 32, device=CUDA), torch.randint(0, 100, (64,), device=CUDA)
    target[::7] = IGNORE_INDEX
    models = [torch.nn.Linear(32, 100).to(CUDA) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused_loss = FusedLSRLoss(smoothing=0.1, validate_targets=False)

    @torch.compile(fullgraph=True)
    def step_fused(model):
        return fused_loss(model(inputs), target)

    def step_native(model):
        return F.cross_entropy(model(inputs), target, label_smoothing=0.1)

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    for _ in range(5):
        for model, opt, step in zip(models, optimizers, (step_fused, step_native), strict=True):
            opt.zero_grad()
            step(model).backward()
            opt.step()
    rtol, atol = TOLERANCE[torch.float32]
    for p_fused, p_native in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_native, rtol=10 * rtol, atol=10 * atol)  # 5 steps of drift


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_host_synchronisation_on_the_hot_path(reduction):
    """Forward and backward of every fused implementation, with padding and class weights, at its
    default arguments: set_sync_debug_mode("error") raises on any synchronising call."""
    logits, target = on_cuda(*random_problem((256, 5000), scale=2.0, ignore_fraction=0.2, seed=52))
    weight = torch.rand(5000, device=CUDA) + 0.5
    for impl in project_losses_on_cuda():
        options = {"weight": weight} if impl.supports_weight else {}
        x = logits.clone().requires_grad_(True)

        def step(impl=impl, x=x, options=options):
            loss = impl.loss(x * 1, target, 0.1, reduction, IGNORE_INDEX, **options)
            return torch.autograd.grad(loss.sum() if reduction == "none" else loss, x)

        step()  # compilation and first-call work may synchronise; the calls after it may not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as e:
            raise AssertionError(f"{impl.name} synchronises with the host: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize(("fn", "ref"), LOSSES, ids=LOSS_IDS)
def test_more_than_two_to_the_31_elements_in_bfloat16(fn, ref):
    """N x C > 2^31: the last rows start beyond any 32-bit offset; checked against float64 there."""
    n, c = 8192, 262145  # 2^31 + 8192 elements, 4.3 GB in bfloat16; C not a power of 2
    assert n * c > 2**31
    gen = torch.Generator(device=CUDA).manual_seed(53)
    logits = torch.empty(n, c, dtype=torch.bfloat16, device=CUDA)
    for start in range(0, n, 1024):
        logits[start : start + 1024] = torch.randn(1024, c, generator=gen, device=CUDA) * 2
    target = torch.randint(0, c, (n,), generator=gen, device=CUDA)
    x = logits.requires_grad_(True)
    loss = fn(x, target, 0.1, "none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device=CUDA)
    z = logits.detach()[rows].double().requires_grad_(True)
    expected = ref(z, target[rows], 0.1, "none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), z)
    rtol, atol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(loss.detach()[rows].double(), expected.detach(), rtol=rtol, atol=atol)
    # Each gradient element is about 1/C: compared as a whole, relative to its norm.
    error = torch.linalg.vector_norm(grad[rows].double() - expected_grad) / torch.linalg.vector_norm(
        expected_grad
    )
    assert error <= rtol


@pytest.mark.parametrize(("fn", "ref"), LOSSES, ids=LOSS_IDS)
def test_non_contiguous_and_spatial_inputs(fn, ref):
    logits, target = on_cuda(*random_problem((6, 9), scale=2.0, seed=54))
    column_major = logits.t().contiguous().t()
    assert not column_major.is_contiguous()
    assert_agrees(fn, ref, column_major, target, smoothing=0.1, reduction="none")
    # A strided view of a layer's output (a copy of it, as loss_and_grad makes, would be contiguous)
    wide = on_cuda(random_problem((6, 18), scale=2.0, seed=55)[0])[0].requires_grad_(True)
    view = (wide * 1)[:, ::2]
    assert not view.is_contiguous()
    loss = fn(view, target, 0.1, "none")
    (loss.double() * upstream(loss.shape)).sum().backward()
    expected, expected_grad = loss_and_grad(
        ref, view.detach().double(), target, smoothing=0.1, reduction="none"
    )
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss.detach().double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(wide.grad[:, ::2].double(), expected_grad, rtol=rtol, atol=atol)
    assert bool((wide.grad[:, 1::2] == 0).all())
    spatial, spatial_target = on_cuda(*random_problem((4, 37, 5), scale=2.0, ignore_fraction=0.2, seed=56))
    for reduction in ("mean", "sum", "none"):
        assert_agrees(fn, ref, spatial, spatial_target, smoothing=0.2, reduction=reduction)
    for dtype in (torch.float16, torch.bfloat16):
        assert_agrees(fn, ref, spatial.to(dtype), spatial_target, smoothing=0.2, reduction="none")


@pytest.mark.parametrize(("fn", "ref"), LOSSES, ids=LOSS_IDS)
def test_runs_on_the_current_stream(fn, ref):
    """On a side stream kept busy, the loss reads the logits written there: a kernel launched on the
    default stream instead would run first and read them before they were written."""
    logits, target = on_cuda(*random_problem((128, 3000), scale=2.0, ignore_fraction=0.2, seed=57))
    busy = torch.randn(4096, 4096, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(10):
            busy = torch.tanh(busy @ busy)  # tens of milliseconds of work ahead of the logits
        x = (logits + 0 * busy[0, 0]).requires_grad_(True)
        loss = fn(x, target, 0.1, "none")
        (grad,) = torch.autograd.grad((loss.double() * upstream(loss.shape)).sum(), x)
    torch.cuda.current_stream().wait_stream(side)
    expected, expected_grad = loss_and_grad(ref, logits.double(), target, smoothing=0.1, reduction="none")
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss.detach().double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol)


# --- the benchmark on CUDA ----------------------------------------------------------------------------


def test_benchmark_inputs_are_made_on_the_device_from_a_seed(monkeypatch):
    case = Case("native", CUDA, "bfloat16", 1000, 3001, 0.1, "forward", ignore_fraction=0.3, weighted=True)
    monkeypatch.setattr(
        measure.problem, "MAKE_BLOCK_ELEMENTS", 3001 * 64
    )  # several blocks, the last one partial
    problem = measure.Problem.make(case, logit_std=2.0)
    again = measure.Problem.make(case, logit_std=2.0)
    other = measure.Problem.make(case, logit_std=2.0, seed=1)
    logits = problem.logits.detach()
    assert logits.device.type == CUDA and logits.dtype == torch.bfloat16 and problem.logits.requires_grad
    assert torch.equal(logits, again.logits.detach()) and not torch.equal(logits, other.logits.detach())
    assert abs(float(logits.float().std()) - 2.0) < 0.05 and bool(torch.isfinite(logits).all())
    assert abs(float(logits[-1].float().std()) - 2.0) < 0.3  # the last, partial block was drawn too
    assert int((problem.target == IGNORE_INDEX).sum()) == 300 and problem.target.device.type == CUDA
    assert problem.weight.device.type == CUDA and bool(
        ((problem.weight >= 0.5) & (problem.weight < 1.5)).all()
    )


def test_cuda_events_time_a_pass_with_the_flush_outside_and_the_wall_clock_beside():
    case = Case("fused-exact", CUDA, "bfloat16", 4096, 32000, 0.1, "forward+backward")
    timed = measure.TimedPass(case, measure.Problem.make(case), lsr.get("fused-exact"))
    timing = measure.time_pass(timed, min_time=0.05)
    assert timing.timer == "cuda-events" and timing.runs_per_sample == 1 and len(timing.samples) >= 7
    assert len(timing.host_samples) == len(timing.samples) and len(timing.wall_samples) >= 3
    # The wall clock of a synchronised call includes the device time: never much below it.
    assert timing.wall_median >= 0.8 * timing.median > 0
    assert measure.l2_flush_bytes(CUDA) >= 2 * (measure.l2_cache_bytes(CUDA) or 0)


def test_a_small_cuda_sweep_is_gated_and_timed_with_events_and_too_large_cases_are_skipped(tmp_path):
    names = ["native", *(impl.name for impl in project_losses_on_cuda())]
    cases = [Case(name, CUDA, "bfloat16", 512, 5000, 0.1, "forward+backward") for name in ("floor", *names)]
    too_large = Case("native", CUDA, "float32", 2**20, 2**20, 0.1, "forward+backward")  # 4 TiB of logits
    rows = run_sweep([*cases, too_large], tmp_path, min_time=0.01, progress=False)
    for row in rows[:-1]:
        assert row["status"] == "ok", row
        assert row["timer"] == "cuda-events" and row["host_s"] > 0 and row["wall_median_s"] > 0, row
        assert row["max_rel_error"] is not None or row["implementation"] == "floor"
    assert rows[-1]["status"] == "skipped" and "estimated peak" in rows[-1]["message"]
