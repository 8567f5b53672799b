"""lsr.fused on CPU, over its backends: chunked eager, compiled, and the Triton kernels (interpreted).

Outputs the losses allocate with torch.empty / torch.empty_like are poisoned with NaN first
(fixture `poisoned_empty`), so agreement with the float64 references shows every element written.
The widest parametrisations run on the eager backend, which is fast; every backend runs the
sharper cases below it. Kernel-specific cases are in test_fused_triton.py.
"""

import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import lsr
from conftest import CPU_BACKENDS, TEST_DEVICES
from helpers import REDUCTIONS, check, plain_grad, random_problem
from lsr.fused import (
    FusedLSRLoss,
    FusedSparseLSRLoss,
    cpu,
    cpu_options,
    fused_label_smoothing,
    fused_sparse_label_smoothing,
    set_cpu_backend,
)
from lsr.reference import exact_reference, sparse_reference


def both(sparse: bool):
    return (
        (fused_sparse_label_smoothing, sparse_reference)
        if sparse
        else (fused_label_smoothing, exact_reference)
    )


# (device, backend): every CPU backend on the CPU; on CUDA, where present, the compiled Triton kernels
# (the CPU backend chosen there changes nothing).
DEVICE_BACKENDS = [("cpu", name) for name in CPU_BACKENDS] + [
    (device, "eager") for device in TEST_DEVICES if device != "cpu"
]
EAGER_AND_DEVICES = [(device, "eager") for device in TEST_DEVICES]


def on(device, *tensors):
    """`tensors` moved to `device`."""
    return [t.to(device) for t in tensors]


# --- agreement with the float64 definitions: wide, on the eager backend ------------------------------


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("device,backend", EAGER_AND_DEVICES, indirect=["backend"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 6), (3, 4, 2, 5), (6,)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_matches_reference(device, backend, sparse, shape, reduction, smoothing, scale):
    fn, ref = both(sparse)
    problem = random_problem(shape, scale=scale, ignore_fraction=0.2 if len(shape) > 1 else 0)
    logits, target = on(device, *problem)
    check(fn, ref, logits, target, atol=1e-5 * scale, smoothing=smoothing, reduction=reduction)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("device,backend", EAGER_AND_DEVICES, indirect=["backend"])
@pytest.mark.parametrize("num_classes", [2, 3, 257, 70_000])
def test_class_counts(device, backend, num_classes):
    logits, target = random_problem((3, num_classes), scale=3.0, seed=num_classes)
    weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(1)) + 0.5
    logits, target, weight = on(device, logits, target, weight)
    for reduction in REDUCTIONS:
        check(fused_label_smoothing, exact_reference, logits, target, smoothing=0.2, reduction=reduction)
        check(
            fused_label_smoothing,
            exact_reference,
            logits,
            target,
            smoothing=0.2,
            reduction=reduction,
            weight=weight,
        )
        check(
            fused_sparse_label_smoothing, sparse_reference, logits, target, smoothing=0.2, reduction=reduction
        )


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_gradcheck_float64(backend, shape):
    logits, target = random_problem(shape, dtype=torch.float64, ignore_fraction=0.2, seed=6)
    weight = torch.rand(shape[1], dtype=torch.float64) + 0.5
    for reduction in REDUCTIONS:
        x = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z, r=reduction: fused_label_smoothing(z, target, 0.3, r), (x,))
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: fused_label_smoothing(z, target, 0.3, r, weight=weight), (x,)
        )
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: fused_sparse_label_smoothing(z, target, 0.3, r), (x,)
        )


# --- every backend: eager, compiled, Triton (interpreted) ---------------------------------------------


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("sparse", [False, True])
def test_backends_match_reference(device, backend, sparse):
    fn, ref = both(sparse)
    for shape in [(7, 5), (5, 37), (3, 40, 2)]:
        logits, target = on(device, *random_problem(shape, scale=2.0, ignore_fraction=0.2, seed=shape[1]))
        for reduction in REDUCTIONS:
            for smoothing in (0.0, 0.3):
                check(fn, ref, logits, target, smoothing=smoothing, reduction=reduction)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, indirect=["backend"])
def test_backends_with_weights_and_other_dtypes(device, backend):
    logits, target = random_problem((9, 37, 2), scale=2.0, ignore_fraction=0.3, seed=4)
    weight = torch.rand(37, generator=torch.Generator().manual_seed(5)) + 0.1
    logits, target, weight = on(device, logits, target, weight)
    for reduction in REDUCTIONS:
        check(
            fused_label_smoothing,
            exact_reference,
            logits,
            target,
            smoothing=0.3,
            reduction=reduction,
            weight=weight,
        )
        x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ours = fused_label_smoothing(x, target, 0.3, reduction, weight=weight)
        theirs = F.cross_entropy(y, target, weight=weight, label_smoothing=0.3, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        ours.sum().backward()
        theirs.sum().backward()
        torch.testing.assert_close(x.grad, y.grad)
    # Compiling is per dtype and takes seconds each: the compiled path checks one half type.
    dtypes = [torch.bfloat16] if backend == "compile" else [torch.float16, torch.bfloat16, torch.float64]
    for dtype in dtypes:
        for fn, ref in (both(False), both(True)):
            check(fn, ref, logits.to(dtype), target, smoothing=0.1, reduction="none")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("sparse", [False, True])
def test_inplace_backward_leaves_the_gradient_in_the_logits(device, backend, sparse):
    fn, ref = both(sparse)
    logits, target = on(device, *random_problem((8, 37), scale=2.0, ignore_fraction=0.2, seed=20))
    ref_grad = plain_grad(ref, logits.double(), target, smoothing=0.3, reduction="mean")
    x = logits.clone().requires_grad_(True) * 1  # a layer's output
    (grad,) = torch.autograd.grad(fn(x, target, 0.3, "mean", inplace_backward=True), x)
    assert grad.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x.detach().double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_inplace_is_caught_when_another_op_saved_the_logits(backend):
    """exp saves its output for backward; overwriting it bumps the version counter, and autograd says so."""
    x = torch.randn(6, 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    loss = fused_label_smoothing(x.exp(), target, 0.1, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, indirect=["backend"])
def test_masked_classes_at_minus_infinity(device, backend):
    """A -inf logit (a masked class) gives plain cross-entropy's finite loss at smoothing 0."""
    logits, target = random_problem((5, 40), seed=23)
    logits[:, -20:] = float("-inf")  # with the Triton backend's blocks of 16: one block all -inf
    logits, target = on(device, logits, target.clamp(max=19))
    x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours, theirs = fused_label_smoothing(x, target), F.cross_entropy(y, target)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS, indirect=["backend"])
def test_sparse_is_accurate_on_confident_rows(device, backend):
    """1 - p_y comes from the non-target terms, so float32 keeps its digits as p_y -> 1 (forming it from
    log p_y = z_y - lse lost them: 1.6811 against 1.5166 on the first row)."""
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(28))
    logits[0, :3] = torch.tensor([20.0, 5.0, 4.0])
    logits[0, 3:] = float("-inf")
    logits[1, 0], logits[2, 39], logits[3, 17] = 40.0, 30.0, 25.0  # 1 - p_y from 1e-16 to 1e-9
    logits, target = on(device, logits, torch.tensor([0, 0, 39, 17]))
    check(
        fused_sparse_label_smoothing,
        sparse_reference,
        logits,
        target,
        rtol=1e-6,
        atol=1e-6,
        smoothing=0.15,
        reduction="none",
    )


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_out_of_range_target_without_validation_raises_on_cpu(backend):
    logits, target = random_problem((4, 5), seed=29)
    target[2] = 5
    for fn in (fused_label_smoothing, fused_sparse_label_smoothing):
        with pytest.raises(RuntimeError, match="out of bounds"):
            fn(logits, target, validate_targets=False)


def check_nan_rows_for_bad_targets(fn, ref, logits, target):
    """fn(z, y) is the per-row loss: rows whose target is outside [0, C) get a NaN loss and gradient,
    the others agree with `ref`."""
    bad = (target < 0) | (target >= logits.shape[1])
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target)
    loss.sum().backward()
    assert loss[bad].isnan().all() and x.grad[bad].isnan().all()
    good_logits, good_target = logits.double()[~bad], target[~bad]
    expected = ref(good_logits, good_target, 0.1, "none")
    torch.testing.assert_close(loss[~bad].detach().double(), expected, rtol=1e-5, atol=1e-5)
    expected_grad = plain_grad(ref, good_logits, good_target, smoothing=0.1, reduction="sum")
    torch.testing.assert_close(x.grad[~bad].double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("inplace", [False, True], ids=["new-memory", "inplace"])
def test_out_of_range_target_on_the_cpp_kernels_gives_nan_rows(backend, inplace):
    """On the C++ kernels a target outside [0, C) is never read either: its row is NaN, loss and gradient."""
    logits, target = random_problem((6, 5), seed=30)
    target[1], target[4] = 5, -3
    for fn, ref in (
        (fused_label_smoothing, exact_reference),
        (fused_sparse_label_smoothing, sparse_reference),
    ):
        check_nan_rows_for_bad_targets(
            lambda z, y, fn=fn: fn(z * 1, y, 0.1, "none", validate_targets=False, inplace_backward=inplace),
            ref,
            logits,
            target,
        )


@pytest.mark.parametrize("backend", ["cpp", "eager"], indirect=True)
def test_ignored_rows_get_no_gradient_whatever_their_upstream_gradient(backend):
    """An ignored row's gradient is 0 even where its upstream gradient is inf (as F.cross_entropy's)."""
    logits, target = random_problem((5, 7), seed=32)
    target[2] = -100
    upstream = torch.ones(5)
    upstream[2] = float("inf")
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        loss = fused_label_smoothing(x * 1, target, 0.1, "none", inplace_backward=inplace)
        loss.backward(upstream)
        assert torch.equal(x.grad[2], torch.zeros(7)) and x.grad.isfinite().all()


def test_out_of_range_target_inside_torch_compile_gives_nan_rows():
    """No host read inside a compiled region: the row's loss and gradient are NaN, the others exact."""
    logits, target = random_problem((6, 5), seed=30)
    target[1], target[4] = 5, -3

    @torch.compile(fullgraph=True)
    def per_row(z, y):
        return fused_label_smoothing(z, y, 0.1, "none", validate_targets=False)

    check_nan_rows_for_bad_targets(per_row, exact_reference, logits, target)


def test_out_of_range_target_on_the_compiled_cpu_path_raises_instead_of_aborting():
    """Inductor's bounds check throws inside an OpenMP region, which aborted the process (exit 134):
    run in a subprocess so that a regression cannot take pytest down with it."""
    script = """
import torch
from lsr.fused import cpu_options, fused_label_smoothing
target = torch.tensor([0, 1, 2, 5, 0, 1, 2, 3])  # 5: out of range for C = 5
with cpu_options("compile"):
    fused_label_smoothing(torch.randn(8, 5), target, validate_targets=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "out of bounds" in result.stderr.splitlines()[-1]


def test_forward_mode_ad_names_the_limit():
    logits, target = random_problem((3, 4), seed=31)
    tangent = torch.randn(3, 4)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(
            lambda z: fused_label_smoothing(z, target, 0.1, validate_targets=False), (logits,), (tangent,)
        )
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        fused_sparse_label_smoothing(fwAD.make_dual(logits, tangent), target, 0.1)


# --- the CPU path's choices, in-place details -----------------------------------------------------------


def test_auto_backend_takes_the_cpp_kernels_else_compiles_only_large_inputs(monkeypatch):
    if cpu.cpp.build_problem() is None:
        assert cpu.cpu_backend(1) == "cpp"
    monkeypatch.setattr(cpu.cpp, "available", lambda: False)
    assert cpu.cpu_backend(cpu.COMPILE_MIN_ELEMENTS - 1) == "eager"
    assert cpu.cpu_backend(cpu.COMPILE_MIN_ELEMENTS) in ("compile", "eager")  # eager without a C++ compiler
    with pytest.raises(ValueError, match="backend"):
        set_cpu_backend("fast")


def test_triton_backend_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        set_cpu_backend("triton")


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_default_never_mutates_the_input(backend):
    for shape in [(8, 7), (4, 3, 5)]:
        logits, target = random_problem(shape, seed=21)
        before = logits.clone()
        x = logits.requires_grad_(True)
        fused_label_smoothing(x, target, 0.2).backward()
        fused_sparse_label_smoothing(x, target, 0.2).backward()
        assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend", ["eager"], indirect=True)
def test_inplace_with_spatial_dims_overwrites_only_an_internal_copy(backend):
    logits, target = random_problem((4, 3, 5), seed=22)
    x = logits.clone().requires_grad_(True) * 1
    (grad,) = torch.autograd.grad(fused_label_smoothing(x, target, 0.2, inplace_backward=True), x)
    assert torch.equal(x.detach(), logits)
    ref_grad = plain_grad(exact_reference, logits.double(), target, smoothing=0.2, reduction="mean")
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_inplace_backward_refuses_leaf_logits():
    """A leaf (a parameter used as logits) would become its own gradient: refused when called."""
    logits, target = random_problem((4, 3), seed=27)
    leaf = logits.clone().requires_grad_(True)
    calls = [
        lambda: fused_label_smoothing(leaf, target, inplace_backward=True),
        lambda: fused_sparse_label_smoothing(leaf, target, inplace_backward=True),
        lambda: FusedLSRLoss(inplace_backward=True)(leaf, target),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="inplace_backward=True would overwrite a leaf tensor"):
            call()
    assert torch.equal(leaf.detach(), logits)
    with torch.no_grad():  # no backward, so nothing to overwrite
        fused_label_smoothing(leaf, target, inplace_backward=True)


# --- edge cases, API --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TEST_DEVICES)
def test_non_contiguous_input(device):
    logits, target = on(device, *random_problem((6, 9), seed=24))
    transposed = logits.t().contiguous().t()
    check(fused_label_smoothing, exact_reference, transposed, target, smoothing=0.1, reduction="none")


def test_argument_errors():
    logits, target = random_problem((4, 3), seed=25)
    with pytest.raises(ValueError, match="weight must not require grad"):
        fused_label_smoothing(logits, target, weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="at least 2 classes"):
        fused_sparse_label_smoothing(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        fused_label_smoothing(logits, torch.tensor([0, 1, 2, 3]))


def test_modules_match_functions_and_registry():
    logits, target = random_problem((6, 5), seed=26)
    weight = torch.rand(5) + 0.5
    assert torch.equal(
        FusedLSRLoss(0.2, "none", weight=weight)(logits, target),
        fused_label_smoothing(logits, target, 0.2, "none", weight=weight),
    )
    assert torch.equal(
        FusedSparseLSRLoss(0.2, "sum", ignore_index=1)(logits, target),
        fused_sparse_label_smoothing(logits, target, 0.2, "sum", 1),
    )
    assert "inplace_backward=False" in repr(FusedLSRLoss(0.1))
    assert lsr.get("fused-exact").supports_weight and not lsr.get("fused-sparse").supports_weight
    assert lsr.get("fused-exact").runs_on("cpu") and lsr.get("fused-sparse").runs_on("cpu")


def test_small_model_trains_under_torch_compile():
    """Linear -> fused loss, compiled in one graph, takes the same SGD steps as eager F.cross_entropy."""
    torch.manual_seed(0)
    inputs, target = torch.randn(32, 16), torch.randint(0, 10, (32,))
    target[::7] = -100
    models = [torch.nn.Linear(16, 10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused_loss = FusedLSRLoss(smoothing=0.1, validate_targets=False)  # no host read: no graph break

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
    for p_fused, p_native in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_native, rtol=1e-5, atol=1e-6)


def test_compiled_passes_never_fall_back_to_eager_after_many_variants(caplog):
    """Nine variants of the statistics pass (dtype x loss x weighting): dynamo's default limit of 8
    would run the ninth as plain expressions over the whole tensor, silently, with N x C temporaries."""
    logits, target = random_problem((4, 6), seed=40)
    weight = torch.rand(6) + 0.5
    variants = [
        (d, None, s) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for s in (0, 1)
    ]
    with cpu_options("compile"), caplog.at_level("WARNING", logger="torch._dynamo"):
        for dtype, w, sparse in [*variants, (torch.float32, weight, False)]:
            z = logits.to(dtype)
            lse = cpu.row_stats(z, target, w, cpu_acc(dtype), bool(sparse))[0]
            torch.testing.assert_close(lse, torch.logsumexp(z.to(cpu_acc(dtype)), dim=1))
    assert "recompile_limit" not in caplog.text


def cpu_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
