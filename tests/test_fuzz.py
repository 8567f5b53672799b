"""Hypothesis: every registered CPU implementation against float64 definitions, on drawn problems.

Exact label smoothing against `F.cross_entropy(label_smoothing=)` itself, SparseLSR against equation 15
(`lsr.sparse_reference`): loss and gradient, over (N, C) and (N, C, d1) shapes, dtypes, smoothing,
reductions, ignored elements, masked classes (-inf logits, sometimes the target's), class weights
(zeros included: a mean over targets of weight 0 is NaN) and upstream gradients. Every implementation
of a kind runs on each example; the fused ones on their eager backend (test_fused.py runs the others).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lsr
from conftest import cpu_implementations
from helpers import TOLERANCE
from lsr.fused import cpu_options


@dataclass
class Problem:
    logits: torch.Tensor  # in the dtype under test; the references read them exactly, in float64
    target: torch.Tensor
    ignore_index: int
    smoothing: float
    reduction: str
    upstream: torch.Tensor  # float64, the loss's shape: d(sum(loss * upstream)) is the gradient checked
    weight: torch.Tensor | None  # float32, or None
    scale: float


@st.composite
def problems(draw, min_classes=1, weights=True):
    n, c = draw(st.integers(1, 4)), draw(st.integers(min_classes, 9))
    spatial = draw(st.sampled_from([(), (1,), (3,)]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    scale = draw(st.sampled_from([0.5, 4.0, 20.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    logits = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * scale
    logits[:, sorted(draw(st.sets(st.integers(0, c - 1), max_size=c - 1)))] = float("-inf")
    target = torch.randint(0, c, (n, *spatial), generator=gen)
    ignore_index = draw(st.sampled_from([-100, 0]))
    ignored = torch.rand(target.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    weight = None
    if weights and draw(st.booleans()):
        weight = torch.rand(c, generator=gen) + 0.1
        weight[sorted(draw(st.sets(st.integers(0, c - 1))))] = 0.0
    return Problem(
        logits=logits.to(dtype),
        target=target.masked_fill(ignored, ignore_index),
        ignore_index=ignore_index,
        smoothing=draw(st.one_of(st.just(0.0), st.floats(1e-3, 1.0))),
        reduction=reduction,
        upstream=torch.rand(target.shape if reduction == "none" else (), generator=gen, dtype=torch.float64)
        + 0.5,
        weight=weight,
        scale=scale,
    )


def loss_and_grad(fn, logits, problem, **weight):
    x = logits.detach().clone().requires_grad_(True)
    # x * 1: a layer's output, not a leaf (the in-place implementation refuses leaves)
    loss = fn(x * 1, problem.target, problem.smoothing, problem.reduction, problem.ignore_index, **weight)
    (loss.double() * problem.upstream).sum().backward()
    return loss.detach(), x.grad


def assert_agree(impl, problem, reference, **weight):
    rtol, atol = TOLERANCE[problem.logits.dtype]
    atol *= max(1.0, problem.scale)
    loss, grad = loss_and_grad(impl.loss, problem.logits, problem, **weight)
    expected_loss, expected_grad = loss_and_grad(reference, problem.logits.double(), problem)
    assert loss.dtype == problem.logits.dtype and grad.dtype == problem.logits.dtype
    torch.testing.assert_close(
        loss.double(), expected_loss, rtol=rtol, atol=atol, equal_nan=True, msg=impl.name
    )
    torch.testing.assert_close(
        grad.double(), expected_grad, rtol=rtol, atol=atol, equal_nan=True, msg=impl.name
    )


def target_probabilities(problem):
    """p_y of the valid elements, in float64."""
    z = problem.logits.double()
    valid = problem.target != problem.ignore_index
    p = torch.softmax(z, 1).gather(1, problem.target.clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return p[valid]


@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_exact_implementations_match_cross_entropy(problem):
    # At smoothing 1, F.cross_entropy's (1 - eps) * nll is 0 * inf = NaN for a masked target, where
    # the definition (uniform q) gives inf: F's artefact is not a case to match
    assume(problem.smoothing < 1 or bool((target_probabilities(problem) > 0).all()))

    def cross_entropy(x, target, smoothing, reduction, ignore_index):
        weight = None if problem.weight is None else problem.weight.double()
        return F.cross_entropy(
            x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing
        )

    with cpu_options("eager", eager_block_elements=8):
        for impl in cpu_implementations():
            if impl.smoothing_kind == "exact":
                assert_agree(impl, problem, cross_entropy, weight=problem.weight)


@settings(max_examples=60, deadline=None)
@given(problem=problems(min_classes=2, weights=False))
def test_sparse_implementations_match_equation_15(problem):
    confident = bool((target_probabilities(problem) > 0.99).any())
    with cpu_options("eager", eager_block_elements=8):
        for impl in cpu_implementations():
            if impl.smoothing_kind != "sparse":
                continue
            if not impl.accurate_near_certainty and confident and problem.logits.dtype != torch.float64:
                continue  # eager equation 15's documented limit: test_sparse_error_on_confident_rows
            assert_agree(impl, problem, lsr.sparse_reference)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    hidden=st.integers(1, 9),
    classes=st.integers(2, 40),
    chunk_rows=st.integers(1, 13),
    smoothing=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    sparse=st.booleans(),
    with_bias=st.booleans(),
    ignore_fraction=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_lm_head_matches_the_float64_definition(
    rows, hidden, classes, chunk_rows, smoothing, reduction, sparse, with_bias, ignore_fraction, seed
):
    """lsr.linear_label_smoothing against F.cross_entropy(F.linear(...)) (or equation 15 on those
    logits) in float64: loss and the gradients of hidden, weight and bias, any chunking."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, hidden, generator=gen, dtype=torch.float64)
    b = torch.randn(classes, generator=gen, dtype=torch.float64) if with_bias else None
    y = torch.randint(0, classes, (rows,), generator=gen)
    y[torch.rand(rows, generator=gen) < ignore_fraction] = -100
    leaves = [h, w] + ([b] if with_bias else [])

    def grads(fn):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        loss = fn(*xs)
        loss.sum().backward()
        return loss.detach(), [x.grad for x in xs]

    def ours(h, w, b=None):
        return lsr.linear_label_smoothing(
            h, w, y, smoothing, bias=b, sparse=sparse, reduction=reduction, chunk_rows=chunk_rows
        )

    def reference(h, w, b=None):
        logits = F.linear(h, w, b)
        if sparse:
            return lsr.sparse_reference(logits, y, smoothing, reduction)
        return F.cross_entropy(logits, y, label_smoothing=smoothing, reduction=reduction)

    loss, got = grads(ours)
    ref_loss, want = grads(reference)
    assume(bool(torch.isfinite(ref_loss).all()))  # a mean over no valid row is NaN in both
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
