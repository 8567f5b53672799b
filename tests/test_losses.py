"""Every registered CPU implementation against the float64 definitions: loss, gradient, conventions."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import lsr
from helpers import REDUCTIONS, TOLERANCE, check, loss_and_grad, random_problem
from lsr.demo import minimise_one_row
from lsr.reference import exact_reference, sparse_reference


@pytest.fixture
def impl(impl):
    """conftest's `impl`, with leaf logits (which the helpers make) turned into a layer's output for the
    in-place implementation: it refuses leaves, which its backward would make their own gradient."""
    if not impl.inplace_backward:
        return impl
    loss = impl.loss
    return dataclasses.replace(impl, loss=lambda input, *args, **kwargs: loss(input * 1, *args, **kwargs))


def on(device, impl, *tensors):
    """`tensors` moved to `device` (the conftest fixture: the CPU, and CUDA where present); the test is
    skipped where `impl` does not run there."""
    if not impl.runs_on(device):
        pytest.skip(f"{impl.name} does not run on {device} here")
    return [t.to(device) for t in tensors]


def assert_matches_reference(impl, logits, target, rtol, atol, **kwargs):
    check(impl.loss, impl.reference, logits, target, rtol=rtol, atol=atol, **kwargs)


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 6), (3, 4, 2, 5), (6,)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.7, 1.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 20.0])
def test_matches_float64_reference(impl, device, shape, reduction, smoothing, scale):
    if not impl.accurate_near_certainty and scale > 5:
        pytest.skip("eager equation 15 is ill-conditioned as p_y -> 1: test_sparse_error_on_confident_rows")
    problem = random_problem(shape, scale=scale, ignore_fraction=0.2 if len(shape) > 1 else 0)
    logits, target = on(device, impl, *problem)
    assert_matches_reference(
        impl, logits, target, rtol=1e-5, atol=1e-5 * scale, smoothing=smoothing, reduction=reduction
    )


@pytest.mark.parametrize("num_classes", [2, 3, 100, 1000, 50_000])
def test_class_counts(impl, device, num_classes):
    logits, target = on(device, impl, *random_problem((4, num_classes), scale=3.0, seed=num_classes))
    for reduction in REDUCTIONS:
        assert_matches_reference(
            impl, logits, target, rtol=1e-5, atol=1e-5, smoothing=0.2, reduction=reduction
        )


def test_ignore_index_values(impl, device):
    """A custom ignore_index; ignored elements give 0 and leave the mean's denominator."""
    problem = random_problem((9, 4, 3), ignore_fraction=0.4, ignore_index=2, seed=3)
    logits, target = on(device, impl, *problem)
    kwargs = dict(smoothing=0.3, ignore_index=2)
    assert_matches_reference(impl, logits, target, rtol=1e-5, atol=1e-6, reduction="mean", **kwargs)
    per_element = impl.loss(logits, target, reduction="none", **kwargs)
    assert (per_element[target == 2] == 0).all() and (per_element[target != 2] > 0).all()
    mean = impl.loss(logits, target, reduction="mean", **kwargs)
    torch.testing.assert_close(mean, per_element.sum() / (target != 2).sum())


def test_weights(impl, device):
    if not impl.supports_weight:
        pytest.skip(f"{impl.name} takes no class weights")
    weight = torch.rand(6, generator=torch.Generator().manual_seed(5)) + 0.1
    logits, target, weight = on(device, impl, *random_problem((8, 6, 2), ignore_fraction=0.2, seed=4), weight)
    for reduction in REDUCTIONS:
        assert_matches_reference(
            impl, logits, target, rtol=1e-5, atol=1e-6, smoothing=0.25, reduction=reduction, weight=weight
        )
        expected = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.25, reduction=reduction)
        torch.testing.assert_close(impl.loss(logits, target, 0.25, reduction, weight=weight), expected)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_gradcheck_float64(impl, shape):
    if not impl.can_repeat_backward:
        pytest.skip(
            "gradcheck runs backward repeatedly through one graph, which the in-place and one-pass modes forbid"
        )
    logits, target = random_problem(shape, dtype=torch.float64, ignore_fraction=0.2, seed=6)
    for reduction in REDUCTIONS:
        x = logits.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z, r=reduction: impl.loss(z, target, 0.3, r), (x,))


def test_zero_smoothing_is_cross_entropy(impl):
    logits, target = random_problem((6, 7, 2), scale=2.0, ignore_fraction=0.2, dtype=torch.float64, seed=7)
    for reduction in REDUCTIONS:
        expected = F.cross_entropy(logits, target, reduction=reduction)
        torch.testing.assert_close(impl.loss(logits, target, 0.0, reduction), expected)


def test_empty_batch_behaves_like_cross_entropy(impl, device):
    logits, target = on(device, impl, torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    for reduction in REDUCTIONS:
        expected = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(impl.loss(logits, target, 0.1, reduction), expected, equal_nan=True)


def test_all_ignored_mean_is_nan_like_cross_entropy(impl, device):
    logits, target = on(device, impl, torch.randn(3, 4), torch.full((3,), -100))
    assert torch.isnan(impl.loss(logits, target, 0.1, "mean"))
    assert impl.loss(logits, target, 0.1, "sum") == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_float64(impl, device, dtype):
    problem = random_problem((16, 40, 3), scale=4.0, dtype=dtype, ignore_fraction=0.1, seed=8)
    logits, target = on(device, impl, *problem)
    for reduction in REDUCTIONS:
        assert_matches_reference(
            impl, logits, target, rtol=2e-2, atol=2e-2, smoothing=0.1, reduction=reduction
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_stay_finite(impl, device, dtype):
    gen = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (8, 6), generator=gen) * 2 - 1
    logits = (signs * 1e4 + torch.randn(8, 6, generator=gen)).to(dtype)  # +-1e4, not all equal
    logits, target = on(device, impl, logits, torch.randint(0, 6, (8,), generator=gen))
    loss, grad = loss_and_grad(impl.loss, logits, target, smoothing=0.1, reduction="none")
    if str(dtype).removeprefix("torch.") in impl.overflows_at_extremes:
        # PyTorch's own arithmetic (kept as is): it sums float16 log-probabilities, -2e4 each, past
        # float16's 65504. Recorded so that a PyTorch change shows up here.
        assert not torch.isfinite(loss).all()
        return
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = loss_and_grad(
        impl.reference, logits.double(), target, smoothing=0.1, reduction="none"
    )
    rtol = max(1e-5, torch.finfo(dtype).eps)  # the result is rounded to the input's dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=1e-2)


def test_input_is_not_mutated(impl):
    if impl.inplace_backward:
        pytest.skip("writes the gradient into the logits by design (tests/test_fused.py)")
    logits, target = random_problem((5, 4, 2), seed=10)
    before = logits.clone()
    x = logits.requires_grad_(True)
    impl.loss(x, target, 0.2).backward()
    assert torch.equal(logits.detach(), before)


def test_sparse_error_on_confident_rows(impl):
    """Equation 15 in float32 with confident rows (p_y -> 1), against float64.

    Eager `sparse` forms log p_y first, as the paper does, and 1 - p_y from it: log p_y carries an
    absolute float32 error of about eps32 |lse|, which log(1 - p_y + 1e-7) divides by (1 - p_y + 1e-7).
    No float32 code that computes log p_y first does better, so its bound is per row, from the float64
    1 - p_y. fused-sparse sums 1 - p_y from the non-target terms: float32 rounding, however close p_y is
    to 1.
    """
    if impl.smoothing_kind != "sparse":
        pytest.skip("equation 15 only")
    logits, target = random_problem((64, 3, 4), scale=20.0, seed=15)
    loss, grad = loss_and_grad(impl.loss, logits, target, smoothing=0.5, reduction="none")
    ref_loss, ref_grad = loss_and_grad(
        impl.reference, logits.double(), target, smoothing=0.5, reduction="none"
    )
    eps32 = torch.finfo(torch.float32).eps
    log_p = torch.log_softmax(logits.double(), dim=1)
    one_minus_p_y = 1 - log_p.gather(1, target.unsqueeze(1)).squeeze(1).exp()
    abs_err_log_p_y = 4 * eps32 * logits.abs().amax(dim=1).double()
    if not impl.accurate_near_certainty:
        bound = 1e-5 + 0.5 * abs_err_log_p_y / (one_minus_p_y + 1e-7)
        grad_bound = 1e-5 + 4 * bound.unsqueeze(1)  # upstream weights are at most 1.5
        assert (bound > 1e-3).any(), "the test should include ill-conditioned rows"
    else:  # the rounding of log p_y = z_y - lse and of the loss; measured: 1.1 and 10 x eps32
        bound = abs_err_log_p_y + 4 * eps32 * ref_loss.abs()
        grad_bound = 32 * eps32
    assert ((loss.double() - ref_loss).abs() <= bound).all()
    assert ((grad.double() - ref_grad).abs() <= grad_bound).all()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_double_backward(impl, dtype):
    """A gradient penalty differentiates the gradient: as the float64 definition does, or a clear error
    (the fused losses' gradient is a closed form, not a graph), also when the upstream gradient is a
    constant."""
    logits, target = random_problem((4, 5), dtype=dtype, ignore_fraction=0.2, seed=16)
    v = torch.rand(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def gradient_penalty_grad(fn, z):
        x = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x, target, 0.3, "mean"), x, create_graph=True)
        return torch.autograd.grad((g.double() * v).sum(), x)[0]

    if not impl.double_backward:
        with pytest.raises(RuntimeError, match=r"double backward.*native_label_smoothing"):
            gradient_penalty_grad(impl.loss, logits)
        x = logits.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="double backward"):
            impl.loss(x, target, 0.3).backward(create_graph=True)
        return
    rtol, atol = TOLERANCE[dtype]
    expected = gradient_penalty_grad(impl.reference, logits.double())
    torch.testing.assert_close(
        gradient_penalty_grad(impl.loss, logits).double(), expected, rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_masked_classes_and_zero_weight_means_like_cross_entropy(impl, device, smoothing):
    """A -inf logit (a masked class; its 0 x -inf at smoothing 0 is 0), and a mean over targets whose
    weights are all 0 (0/0: NaN, gradient included): F.cross_entropy's answers, loss and gradient."""
    if impl.smoothing_kind != "exact":
        pytest.skip("F.cross_entropy computes exact label smoothing")
    logits, target = random_problem((4, 5), dtype=torch.float64, ignore_fraction=0.3, seed=17)
    logits[:, 4] = float("-inf")
    target = torch.where(target == 4, 3, target)
    zero_for_targets = torch.ones(5, dtype=torch.float64).index_fill(0, target[target >= 0], 0.0)
    logits, target, zero_for_targets = on(device, impl, logits, target, zero_for_targets)
    cases = [{}, {"weight": zero_for_targets}] if impl.supports_weight else [{}]
    for kwargs in cases:
        for reduction in REDUCTIONS:
            loss, grad = loss_and_grad(
                impl.loss, logits, target, smoothing=smoothing, reduction=reduction, **kwargs
            )
            expected_loss, expected_grad = loss_and_grad(
                F.cross_entropy, logits, target, label_smoothing=smoothing, reduction=reduction, **kwargs
            )
            torch.testing.assert_close(loss, expected_loss, equal_nan=True)
            torch.testing.assert_close(grad, expected_grad, equal_nan=True)


# --- properties of the definitions ----------------------------------------------------------------


def test_dense_equals_native():
    logits, target = random_problem((32, 11, 3), scale=5.0, ignore_fraction=0.1, dtype=torch.float64, seed=11)
    weight = torch.rand(11, dtype=torch.float64) + 0.5
    for reduction in REDUCTIONS:
        for w in (None, weight):
            torch.testing.assert_close(
                lsr.dense_label_smoothing(logits, target, 0.15, reduction, weight=w),
                lsr.native_label_smoothing(logits, target, 0.15, reduction, weight=w),
            )


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
@pytest.mark.parametrize("scale", [0.1, 3.0, 20.0])
def test_sparse_is_a_lower_bound_of_exact_smoothing_row_by_row(num_classes, scale):
    """Jensen: equation 15's non-target term never exceeds exact smoothing's."""
    logits, target = random_problem((64, num_classes), scale=scale, dtype=torch.float64, seed=num_classes)
    for smoothing in (0.01, 0.1, 0.5, 1.0):
        sparse = lsr.sparse_label_smoothing(logits, target, smoothing, "none")
        exact = lsr.dense_label_smoothing(logits, target, smoothing, "none")
        assert (sparse <= exact + 1e-12).all()


def test_exact_reference_gradient_is_softmax_minus_q():
    """The reference itself, against the closed form dL/dz = softmax(z) - q."""
    logits, target = random_problem((5, 7), scale=2.0, dtype=torch.float64, seed=12)
    x = logits.clone().requires_grad_(True)
    exact_reference(x, target, 0.3, "sum").backward()
    q = torch.full((5, 7), 0.3 / 7, dtype=torch.float64)
    q[torch.arange(5), target] += 0.7
    torch.testing.assert_close(x.grad, torch.softmax(logits, 1) - q)


@pytest.mark.parametrize("num_classes,smoothing", [(10, 0.1), (5, 0.3)])
def test_minimising_sparse_smooths_to_the_label_smoothing_target(num_classes, smoothing):
    # The seed README's snippet fails exactly this: its sign drives p_y to 1 (checked just below).
    p_y, _ = minimise_one_row(lsr.sparse_label_smoothing, num_classes, smoothing)
    assert p_y == pytest.approx(1 - smoothing + smoothing / num_classes, abs=1e-3)
    p_y_exact, _ = minimise_one_row(lsr.dense_label_smoothing, num_classes, smoothing)
    assert p_y_exact == pytest.approx(1 - smoothing + smoothing / num_classes, abs=1e-3)


def test_seed_snippet_sign_is_anti_smoothing():
    p_y, loss = minimise_one_row(lsr.seed_snippet_sparse_lsr, num_classes=10, smoothing=0.1)
    assert p_y > 0.999 and loss < 0


def test_module_with_the_seed_arguments_trains_one_row_to_the_smoothed_target():
    loss_fn = lsr.SparseLSRLoss(smoothing=0.1, reduction="mean")
    p_y, _ = minimise_one_row(lambda z, y, _: loss_fn(z, y), num_classes=10, smoothing=0.1)
    assert p_y == pytest.approx(0.91, abs=1e-3)


def test_modules_match_functions():
    logits, target = random_problem((6, 5), seed=13)
    weight = torch.rand(5) + 0.5
    assert torch.equal(
        lsr.SparseLSRLoss(0.2, "sum", ignore_index=1)(logits, target),
        lsr.sparse_label_smoothing(logits, target, 0.2, "sum", 1),
    )
    assert torch.equal(
        lsr.LSRLoss(0.2, "none", weight=weight)(logits, target),
        lsr.dense_label_smoothing(logits, target, 0.2, "none", weight=weight),
    )
    assert "smoothing=0.2" in repr(lsr.SparseLSRLoss(0.2))


@pytest.mark.parametrize("module", [lsr.LSRLoss, lsr.SparseLSRLoss, lsr.FusedLSRLoss, lsr.FusedSparseLSRLoss])
def test_modules_document_their_arguments(module):
    """help(module) lists every constructor argument in an Args: section, as the functions' docs do."""
    doc = inspect.getdoc(module)
    assert "Args:" in doc
    arguments = doc.split("Args:")[1]
    for name in list(inspect.signature(module).parameters):
        assert f"\n    {name}: " in arguments, f"{module.__name__} does not document {name!r}"


def test_sparse_at_smoothing_one_is_finite_and_well_defined():
    logits, target = random_problem((4, 3), seed=14)
    out = lsr.sparse_label_smoothing(logits, target, 1.0, "none")
    assert torch.isfinite(out).all()
    assert math.isclose(out.sum().item(), sparse_reference(logits, target, 1.0, "sum").item(), rel_tol=1e-5)


def test_a_masked_target_at_smoothing_1_gives_what_f_cross_entropy_gives(impl):
    """z = [0, -inf, 1], y = 1, smoothing 1: F.cross_entropy computes (1 - eps) nll + eps smooth, and
    0 * inf is NaN; every exact implementation returns that NaN (the definition's value is +inf).
    SparseLSR keeps equation 15's value: its target coefficient is 1/C, not 0, so +inf."""
    z = torch.tensor([[0.0, float("-inf"), 1.0]], dtype=torch.float64)
    y = torch.tensor([1])
    loss = impl.loss(z.clone() * 1, y, 1.0).item()
    if impl.smoothing_kind == "exact":
        assert math.isnan(F.cross_entropy(z, y, label_smoothing=1.0).item()) and math.isnan(loss)
    else:
        assert loss == lsr.sparse_reference(z, y, 1.0).item() == float("inf")
