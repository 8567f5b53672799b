"""The one-pass mode (gradient_in_forward=True) of lsr.fused, on its three paths.

"cpp" and "eager" are its CPU backends (the C++ kernel, plain PyTorch over row blocks);
"triton" is triton_kernels.forward_gradient on CPU tensors under the Triton interpreter, with
16-column blocks so that rows of a few dozen classes take the multi-block paths. Row losses the
kernels allocate with torch.empty are poisoned with NaN first (fixture `poisoned_empty`); the
gradient is written over the logits, so agreement with float64 shows every element overwritten.
"""

import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import lsr
from conftest import TRITON_INTERPRETER
from helpers import REDUCTIONS, TOLERANCE, check, random_problem
from lsr.fused import (
    FusedLSRLoss,
    FusedSparseLSRLoss,
    cpu_options,
    fused_label_smoothing,
    fused_sparse_label_smoothing,
)
from lsr.fused import cpp as cpp_kernels
from lsr.reference import exact_reference, sparse_reference
from test_fused import check_nan_rows_for_bad_targets

PATHS = ["cpp", "eager", "triton"]


@pytest.fixture
def path(request, monkeypatch):
    """Run the one-pass mode on CPU through `request.param` (parametrise indirectly over PATHS)."""
    name = request.param
    if name == "triton":
        if not TRITON_INTERPRETER:
            pytest.skip("the Triton path needs Triton and TRITON_INTERPRET=1 before it is imported")
        from lsr.fused import triton_kernels

        monkeypatch.setattr(triton_kernels, "ONEPASS_BLOCK", 16)
        monkeypatch.setattr(triton_kernels, "SCALE_BLOCK", 16)
        with cpu_options("triton"):
            yield name
        return
    if name == "cpp" and cpp_kernels.build_problem() is not None:
        pytest.skip(f"the C++ kernels cannot be built here: {cpp_kernels.build_problem()}")
    with cpu_options(name, eager_block_elements=64 if name == "eager" else None):
        yield name


def onepass_and_reference(sparse: bool):
    """The one-pass loss and its float64 reference."""
    if sparse:
        return functools.partial(fused_sparse_label_smoothing, gradient_in_forward=True), sparse_reference
    return functools.partial(fused_label_smoothing, gradient_in_forward=True), exact_reference


def reference_grad(ref, logits, target, upstream, **kwargs):
    z = logits.double().requires_grad_(True)
    loss = ref(z, target, **kwargs)
    (loss * upstream).sum().backward()
    return loss.detach(), z.grad


# --- agreement with the float64 definitions -----------------------------------------------------------


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_reference(path, sparse):
    """Every reduction and layout, ignored targets, smoothing 0 and above, random upstream gradients."""
    fn, ref = onepass_and_reference(sparse)
    interpreted = path == "triton"  # slow: fewer cases
    shapes = [(5, 37), (3, 20, 2)] if interpreted else [(7, 5), (5, 37), (3, 40, 2), (6,)]
    for shape in shapes:
        logits, target = random_problem(shape, scale=2.0, ignore_fraction=0.2 if len(shape) > 1 else 0)
        for reduction in REDUCTIONS:
            for smoothing in (0.3,) if interpreted else (0.0, 0.3, 1.0):  # (0 below, masked classes)
                check(fn, ref, logits, target, smoothing=smoothing, reduction=reduction)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradients(path, sparse, reduction):
    """An upstream gradient of 1 (returned as written), 0.5 (scaled), and per row for "none"."""
    fn, ref = onepass_and_reference(sparse)
    logits, target = random_problem((6, 37), scale=2.0, ignore_fraction=0.3, seed=3)
    if reduction == "none":
        gen = torch.Generator().manual_seed(4)
        upstreams = [torch.ones(6), torch.rand(6, generator=gen) + 0.5, torch.full((6,), 0.5)]
    else:
        upstreams = [torch.tensor(1.0), torch.tensor(0.5), torch.tensor(-3.0)]
    for upstream in upstreams:
        x = logits.clone().requires_grad_(True)
        h = x * 1
        loss = fn(h, target, 0.2, reduction)
        (grad,) = torch.autograd.grad(loss, h, upstream)
        assert grad.data_ptr() == h.data_ptr()  # the logits' memory, handed on
        expected_loss, expected_grad = reference_grad(
            ref, logits, target, upstream.double(), smoothing=0.2, reduction=reduction
        )
        torch.testing.assert_close(loss.detach().double(), expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_per_row_upstream_of_a_sum(path):
    """loss.sum().backward() hands "none" a broadcast upstream gradient (stride 0), read in place."""
    fn, ref = onepass_and_reference(False)
    logits, target = random_problem((3, 20, 2), scale=2.0, ignore_fraction=0.2, seed=5)
    x = logits.clone().requires_grad_(True)
    fn(x * 1, target, 0.1, "none").sum().backward()
    _, expected = reference_grad(ref, logits, target, 1.0, smoothing=0.1, reduction="none")
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_weights_and_ignore_index_against_cross_entropy(path):
    fn, ref = onepass_and_reference(False)
    logits, target = random_problem((5, 37, 2), scale=2.0, ignore_fraction=0.3, seed=6, ignore_index=3)
    weight = torch.rand(37, generator=torch.Generator().manual_seed(7)) + 0.1
    for reduction in REDUCTIONS:
        if path != "triton":  # the interpreter is slow; F.cross_entropy below checks it
            check(fn, ref, logits, target, smoothing=0.3, reduction=reduction, ignore_index=3, weight=weight)
        x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ours = fn(x * 1, target, 0.3, reduction, 3, weight=weight)
        theirs = F.cross_entropy(
            y, target, weight=weight, ignore_index=3, label_smoothing=0.3, reduction=reduction
        )
        torch.testing.assert_close(ours, theirs)
        ours.sum().backward()
        theirs.sum().backward()
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_against_float64(path, dtype):
    """Half logits are computed in float32 (loss and gradient rounded once, then scaled); float64 in
    float64, to its tolerance."""
    logits, target = random_problem((5, 37), scale=3.0, dtype=dtype, ignore_fraction=0.2, seed=8)
    weight = torch.rand(37, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    for reduction in ["none"] if path == "triton" else REDUCTIONS:  # the interpreter is slow
        for sparse in (False, True):
            fn, ref = onepass_and_reference(sparse)
            check(fn, ref, logits, target, smoothing=0.1, reduction=reduction)
        fn, ref = onepass_and_reference(False)
        check(fn, ref, logits, target, smoothing=0.1, reduction=reduction, weight=weight.to(dtype))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_masked_classes_and_zero_weight_mean(path):
    """A -inf logit adds nothing at smoothing 0 (no 0 * inf); a mean over targets whose weights are all
    0 is NaN, gradient included: F.cross_entropy's answers."""
    fn, _ = onepass_and_reference(False)
    logits, target = random_problem((5, 40), ignore_fraction=0.3, seed=10)
    logits[:, -20:] = float("-inf")  # with the Triton path's blocks of 16: one block all -inf
    target = torch.where(target >= 20, target - 20, target)
    zero_for_targets = torch.ones(40).index_fill(0, target[target >= 0], 0.0)
    for weight in (None, zero_for_targets):
        x, y = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ours, theirs = fn(x * 1, target, weight=weight), F.cross_entropy(y, target, weight=weight)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(x.grad, y.grad, equal_nan=True)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sparse_is_accurate_on_confident_rows(path):
    """1 - p_y from the non-target terms keeps its digits as p_y -> 1, in the one pass too."""
    fn, ref = onepass_and_reference(True)
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(11))
    logits[0, :3] = torch.tensor([20.0, 5.0, 4.0])
    logits[0, 3:] = float("-inf")
    logits[1, 0], logits[2, 39], logits[3, 17] = 40.0, 30.0, 25.0  # 1 - p_y from 1e-16 to 1e-9
    target = torch.tensor([0, 0, 39, 17])
    check(fn, ref, logits, target, rtol=1e-6, atol=1e-6, smoothing=0.15, reduction="none")


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_out_of_range_targets_without_validation_give_nan_rows(path, sparse):
    """validate_targets=False: a target outside [0, C) is never read; its row is NaN, loss and gradient."""
    fn, ref = onepass_and_reference(sparse)
    logits, target = random_problem((6, 37), seed=12)
    target[1], target[2], target[5] = 37, -1, 40
    check_nan_rows_for_bad_targets(
        lambda z, y: fn(z * 1, y, 0.1, "none", validate_targets=False), ref, logits, target
    )


# --- what the mode does to the logits -----------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_the_forward_pass_leaves_the_gradient_in_the_logits(path, sparse):
    fn, ref = onepass_and_reference(sparse)
    logits, target = random_problem((8, 37), scale=2.0, ignore_fraction=0.2, seed=13)
    x = logits.clone().requires_grad_(True)
    h = x * 1  # a layer's output
    fn(h, target, 0.3, "mean")
    _, expected = reference_grad(ref, logits, target, 1.0, smoothing=0.3, reduction="mean")
    torch.testing.assert_close(h.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["eager"], indirect=True)
def test_inputs_copied_into_rows_are_not_overwritten(path):
    """(N, C, d) and non-contiguous (N, C) logits are copied into rows first: the copy is overwritten."""
    fn, ref = onepass_and_reference(False)
    spatial, target = random_problem((4, 3, 5), seed=14)
    x = spatial.clone().requires_grad_(True)
    h = x * 1
    loss = fn(h, target, 0.2)
    assert torch.equal(h.detach(), spatial)
    loss.backward()
    _, expected = reference_grad(ref, spatial, target, 1.0, smoothing=0.2, reduction="mean")
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    transposed, target = random_problem((6, 9), seed=15)
    h = transposed.t().contiguous().t().requires_grad_(True) * 1
    before = h.detach().clone()
    fn(h, target, 0.2)
    assert not h.is_contiguous() and torch.equal(h.detach(), before)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_an_op_that_saved_the_logits_raises_at_backward(path):
    """exp saves its output for backward; the forward pass overwrote it and bumped its version."""
    x = torch.randn(6, 5, requires_grad=True)
    target = torch.randint(0, 5, (6,))
    loss = fused_label_smoothing(x.exp(), target, 0.1, gradient_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_refusals():
    logits, target = random_problem((4, 3), seed=16)
    leaf = logits.clone().requires_grad_(True)
    calls = [
        lambda: fused_label_smoothing(leaf, target, gradient_in_forward=True),
        lambda: fused_sparse_label_smoothing(leaf, target, gradient_in_forward=True),
        lambda: FusedLSRLoss(gradient_in_forward=True)(leaf, target),
        lambda: FusedSparseLSRLoss(0.1, gradient_in_forward=True)(leaf, target),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="gradient_in_forward=True would overwrite a leaf tensor"):
            call()
    assert torch.equal(leaf.detach(), logits)
    for call in (
        lambda: fused_label_smoothing(leaf * 1, target, inplace_backward=True, gradient_in_forward=True),
        lambda: FusedSparseLSRLoss(inplace_backward=True, gradient_in_forward=True),
    ):
        with pytest.raises(ValueError, match="choose one"):
            call()


def test_without_a_gradient_to_compute_the_logits_are_only_read():
    """No grad mode, or logits that do not require grad: nothing to write, so nothing is written."""
    logits, target = random_problem((5, 7), seed=17)
    x = logits.clone().requires_grad_(True) * 1
    with torch.no_grad():
        loss = fused_label_smoothing(x, target, 0.2, gradient_in_forward=True)
    plain = logits.clone()
    assert fused_sparse_label_smoothing(plain, target, 0.2, gradient_in_forward=True).isfinite()
    assert torch.equal(x.detach(), logits) and torch.equal(plain, logits)
    torch.testing.assert_close(loss.double(), exact_reference(logits.double(), target, 0.2))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_one_backward_only_and_once_differentiable():
    logits, target = random_problem((4, 5), seed=18)
    x = logits.clone().requires_grad_(True)
    loss = fused_label_smoothing(x * 1, target, 0.1, gradient_in_forward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        loss.backward()
    loss = fused_sparse_label_smoothing(x * 1, target, 0.1, gradient_in_forward=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    tangent = torch.randn(4, 5)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        fused_label_smoothing(fwAD.make_dual(logits, tangent), target, 0.1, gradient_in_forward=True)


# --- torch.compile, the registry ------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean"])
def test_small_model_trains_under_torch_compile(reduction):
    """Linear -> one-pass loss, compiled in one graph, takes the same SGD steps as eager F.cross_entropy,
    with an upstream gradient other than 1 (the loss halved)."""
    torch.manual_seed(0)
    inputs, target = torch.randn(32, 16), torch.randint(0, 10, (32,))
    target[::7] = -100
    models = [torch.nn.Linear(16, 10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    loss_fn = FusedLSRLoss(0.1, reduction, validate_targets=False, gradient_in_forward=True)

    @torch.compile(fullgraph=True)
    def step_fused(model):
        return 0.5 * loss_fn(model(inputs), target).sum()

    def step_native(model):
        return 0.5 * F.cross_entropy(model(inputs), target, label_smoothing=0.1, reduction=reduction).sum()

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    for _ in range(3):
        for model, opt, step in zip(models, optimizers, (step_fused, step_native), strict=True):
            opt.zero_grad()
            step(model).backward()
            opt.step()
    for p_fused, p_native in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p_fused, p_native, rtol=1e-5, atol=1e-6)


def test_registered_with_their_flags():
    for name, sparse in (("fused-exact-onepass", False), ("fused-sparse-onepass", True)):
        impl = lsr.get(name)
        assert impl.gradient_in_forward and not impl.inplace_backward and not impl.can_repeat_backward
        assert impl.smoothing_kind == ("sparse" if sparse else "exact")
        assert impl.supports_weight is not sparse and impl.min_classes == (2 if sparse else 1)
        assert impl.runs_on("cpu")
    assert "gradient_in_forward=True" in repr(FusedLSRLoss(0.1, gradient_in_forward=True))


# --- the Triton kernels at their real block sizes ---------------------------------------------------


@pytest.mark.skipif(not TRITON_INTERPRETER, reason="needs Triton, imported with TRITON_INTERPRET=1")
@pytest.mark.parametrize("sparse", [False, True])
def test_triton_kernels_at_the_largest_class_count(sparse):
    """C = 262144 with the real block sizes: 64 blocks per sweep, 64 scaling programs."""
    fn, ref = onepass_and_reference(sparse)
    logits, target = random_problem((1, 262_144), scale=3.0, seed=19)
    rtol, atol = TOLERANCE[torch.float32]
    with cpu_options("triton"):
        check(fn, ref, logits, target, rtol=rtol, atol=atol, smoothing=0.1, reduction="none")
