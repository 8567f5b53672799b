"""The LM head (`lsr.linear_label_smoothing`): loss and the gradients of hidden, lm_weight and bias
against float64 F.cross_entropy(F.linear(...)) and equation 15, over reductions, class weights,
ignored rows (a whole chunk of them too), bias, 3-D hidden, dtypes and chunk sizes that do not divide
N; its errors; and its memory: one chunk of logits, never N x V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lsr
from conftest import TRITON_INTERPRETER
from lsr.bench.measure import cpu_peak_bytes
from lsr.fused import cpu_options

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2}


def problem(dtype, shape=(37,), hidden=16, classes=101, seed=0, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(classes, hidden, generator=gen, dtype=torch.float64) / 2).to(dtype)
    b = torch.randn(classes, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, shape, generator=gen)
    y.view(-1)[::ignore_every] = -100
    y.view(-1)[8:16] = -100  # rows 8-15: a whole chunk of 8 ignored
    return h, w, b, y


def run(fn, h, w, b, y, upstream_seed=1):
    """Loss and the gradients of (hidden, weight, bias) of sum(loss * u), u random in [0.5, 1.5)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    loss = fn(*leaves, y)
    u = (
        torch.rand(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
        + 0.5
    )
    (loss.double() * u).sum().backward()
    return loss.detach().double(), [t.grad.double() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["exact", "weighted", "sparse"])
@pytest.mark.parametrize("shape", [(37,), (4, 9)], ids=["2d", "3d"])
def test_matches_the_float64_definition(dtype, reduction, kind, shape):
    h, w, b, y = problem(dtype, shape)
    weight = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    options = {"sparse": kind == "sparse", "weight": weight.to(dtype) if kind == "weighted" else None}

    def ours(h, w, b, y):
        return lsr.linear_label_smoothing(h, w, y, 0.1, bias=b, reduction=reduction, chunk_rows=8, **options)

    def reference(h, w, b, y):
        logits = F.linear(h.double(), w.double(), b.double())
        if kind == "sparse":
            return lsr.sparse_reference(logits.movedim(-1, 1), y, 0.1, reduction)
        cw = weight if kind == "weighted" else None
        return F.cross_entropy(logits.movedim(-1, 1), y, weight=cw, label_smoothing=0.1, reduction=reduction)

    loss, grads = run(ours, h, w, b, y)
    ref_loss, ref_grads = run(reference, h, w, b, y)
    tol = TOLERANCE[dtype]
    scale = ref_loss.abs().max().item() + 1
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol * scale)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * (want.abs().max().item() + 1e-3))
    assert (grads[0].reshape(-1, h.shape[-1])[8:16] == 0).all()  # the ignored chunk: no gradient


@pytest.mark.skipif(
    not TRITON_INTERPRETER, reason="needs Triton and TRITON_INTERPRET=1 before it is imported"
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["exact", "sparse"])
def test_the_triton_kernels_per_chunk_match_the_float64_definition(reduction, kind):
    """The CUDA path (the Triton one-pass kernel on each chunk) on CPU tensors under the interpreter."""
    h, w, b, y = problem(torch.float32)

    def ours(h, w, b, y):
        with cpu_options("triton"):
            return lsr.linear_label_smoothing(
                h, w, y, 0.1, bias=b, reduction=reduction, chunk_rows=8, sparse=kind == "sparse"
            )

    def reference(h, w, b, y):
        logits = F.linear(h.double(), w.double(), b.double())
        if kind == "sparse":
            return lsr.sparse_reference(logits, y, 0.1, reduction)
        return F.cross_entropy(logits, y, label_smoothing=0.1, reduction=reduction)

    loss, grads = run(ours, h, w, b, y)
    ref_loss, ref_grads = run(reference, h, w, b, y)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol * (ref_loss.abs().max().item() + 1))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * (want.abs().max().item() + 1e-3))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_chunk_of_bfloat16_matches_the_float64_definition(reduction):
    """The default chunk holds every row here: d_lm_weight is that chunk's one product, in bfloat16
    (no float32 accumulator), and still matches the float64 definition."""
    h, w, b, y = problem(torch.bfloat16)

    def ours(h, w, b, y):
        return lsr.linear_label_smoothing(h, w, y, 0.1, bias=b, reduction=reduction)

    def reference(h, w, b, y):
        return F.cross_entropy(
            F.linear(h.double(), w.double(), b.double()), y, label_smoothing=0.1, reduction=reduction
        )

    loss, grads = run(ours, h, w, b, y)
    ref_loss, ref_grads = run(reference, h, w, b, y)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol * (ref_loss.abs().max().item() + 1))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * (want.abs().max().item() + 1e-3))


def test_without_bias_and_under_no_grad():
    h, w, _, y = problem(torch.float32)
    loss = lsr.linear_label_smoothing(h, w, y, 0.2, chunk_rows=10)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), y, label_smoothing=0.2), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lsr.linear_label_smoothing(h, w, y, 0.2), loss)
    module = lsr.LinearLSRLoss(0.2, chunk_rows=10)
    assert torch.allclose(module(h, w, y), loss) and "chunk_rows=10" in repr(module)


def test_every_row_ignored_gives_nan_as_f_cross_entropy():
    h, w, b, y = problem(torch.float32)
    y = torch.full_like(y, -100)
    assert torch.isnan(lsr.linear_label_smoothing(h, w, y, 0.1, bias=b))
    assert lsr.linear_label_smoothing(h, w, y, 0.1, bias=b, reduction="sum") == 0


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"w": torch.randn(101, 15)}, ValueError, "lm_weight must be"),
        ({"w": torch.randn(101, 16, dtype=torch.float64)}, TypeError, "share a dtype"),
        ({"y": torch.full((37,), 101)}, ValueError, "101"),
        ({"y": torch.zeros(36, dtype=torch.long)}, ValueError, "target must"),
        ({"smoothing": 1.5}, ValueError, "smoothing"),
        ({"b": torch.randn(100)}, ValueError, "bias must be"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(change, error, words):
    h, w, b, y = problem(torch.float32)
    args = {"h": h, "w": w, "b": b, "y": y, "smoothing": 0.1, "chunk_rows": None} | change
    with pytest.raises(error, match=words):
        lsr.linear_label_smoothing(
            args["h"], args["w"], args["y"], args["smoothing"], bias=args["b"], chunk_rows=args["chunk_rows"]
        )


@pytest.mark.parametrize("sparse", [False, True], ids=["exact", "sparse"])
def test_never_more_than_a_chunk_of_logits_alive(sparse):
    """Peak above the inputs during forward+backward: the three gradients, one chunk of logits and
    O(N) bookkeeping; against the materialised loss's N x V logits (3 copies in eager PyTorch)."""
    n, hidden, classes, chunk = 2048, 64, 4000, 128
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(classes, hidden, requires_grad=True)
    y = torch.randint(0, classes, (n,))

    def step():
        lsr.linear_label_smoothing(h, w, y, 0.1, sparse=sparse, chunk_rows=chunk).backward()
        h.grad = w.grad = None  # the gradients count in the peak, then go

    gradients = 4 * (n * hidden + classes * hidden)
    one_chunk = 4 * chunk * classes
    peak = cpu_peak_bytes(step)
    assert peak <= 2 * gradients + 2 * one_chunk + 64 * n, peak  # gradients made then handed on
    assert peak < 0.2 * 4 * n * classes  # a fifth of one N x V float32 tensor


@pytest.mark.parametrize("units", [False, True], ids=["float32-product", "half-product"])
def test_both_half_weight_gradient_paths_match_the_float64_definition(monkeypatch, units):
    """Half weights over several chunks: the chunk's d_lm_weight product in float32 (a CPU without
    half-precision matrix units) or in the weights' dtype (other CPUs, GPUs), both summed in float32."""
    monkeypatch.setattr(lsr.head, "cpu_has_half_matrix_units", lambda: units)
    h, w, b, y = problem(torch.bfloat16)

    def ours(h, w, b, y):
        return lsr.linear_label_smoothing(h, w, y, 0.1, bias=b, chunk_rows=8)

    def reference(h, w, b, y):
        return F.cross_entropy(F.linear(h.double(), w.double(), b.double()), y, label_smoothing=0.1)

    loss, grads = run(ours, h, w, b, y)
    ref_loss, ref_grads = run(reference, h, w, b, y)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * (want.abs().max().item() + 1e-3))
