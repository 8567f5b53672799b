"""The Triton kernels of lsr.fused, run on CPU tensors by the Triton interpreter, against float64.

TRITON_INTERPRET=1 must be set before Triton is imported (the nox tests session sets it; this module
sets it too when it is first to import Triton). The interpreter is slow: problems stay small, and
the block sizes are shrunk so that small rows still take the kernels' multi-block paths.
"""

import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton was imported without TRITON_INTERPRET=1: no interpreter", allow_module_level=True)

from helpers import random_problem  # noqa: E402
from lsr.fused import fused_label_smoothing, fused_sparse_label_smoothing, set_cpu_backend  # noqa: E402
from lsr.fused import triton_kernels as tk  # noqa: E402
from lsr.reference import exact_reference, sparse_reference  # noqa: E402
from test_fused import REDUCTIONS, check, plain_grad, poisoned_empty  # noqa: E402, F401


@pytest.fixture(autouse=True)
def triton_backend():
    previous = set_cpu_backend("triton")
    yield
    set_cpu_backend(previous)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 columns: rows of a few dozen classes take several steps of the row loop."""
    monkeypatch.setattr(tk, "STATS_BLOCK", 16)
    monkeypatch.setattr(tk, "GRADIENT_BLOCK", 16)


@pytest.mark.usefixtures("poisoned_empty", "small_blocks")
@pytest.mark.parametrize("shape", [(7, 5), (5, 37), (3, 40, 2)])
@pytest.mark.parametrize("sparse", [False, True])
def test_kernels_match_reference(shape, sparse):
    fn, ref = (
        (fused_sparse_label_smoothing, sparse_reference)
        if sparse
        else (fused_label_smoothing, exact_reference)
    )
    logits, target = random_problem(shape, scale=2.0, ignore_fraction=0.2, seed=shape[1])
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.3):
            check(fn, ref, logits, target, smoothing=smoothing, reduction=reduction)


@pytest.mark.usefixtures("poisoned_empty", "small_blocks")
def test_kernels_with_weights_and_half_precision():
    logits, target = random_problem((6, 37), scale=2.0, ignore_fraction=0.2, seed=30)
    weight = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.1
    for reduction in REDUCTIONS:
        check(
            fused_label_smoothing,
            exact_reference,
            logits,
            target,
            smoothing=0.2,
            reduction=reduction,
            weight=weight,
        )
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        check(
            fused_label_smoothing, exact_reference, logits.to(dtype), target, smoothing=0.2, reduction="none"
        )
        check(
            fused_sparse_label_smoothing,
            sparse_reference,
            logits.to(dtype),
            target,
            smoothing=0.2,
            reduction="sum",
        )


@pytest.mark.usefixtures("poisoned_empty")
def test_kernels_at_the_largest_class_count():
    """C = 262144 with the real block sizes: 32 steps of the row loop, 64 gradient programs per row."""
    logits, target = random_problem((2, 262_144), scale=3.0, seed=31)
    check(fused_label_smoothing, exact_reference, logits, target, smoothing=0.1, reduction="mean")


@pytest.mark.usefixtures("small_blocks")
def test_kernel_inplace_backward_and_version_counter():
    logits, target = random_problem((5, 37), scale=2.0, seed=32)
    ref_grad = plain_grad(exact_reference, logits.double(), target, smoothing=0.3, reduction="mean")
    x = logits.clone().requires_grad_(True)
    fused_label_smoothing(x, target, 0.3, inplace_backward=True).backward()
    torch.testing.assert_close(x.detach().double(), ref_grad, rtol=1e-5, atol=1e-6)
    y = logits.clone().requires_grad_(True)
    loss = fused_label_smoothing(y.exp(), target, 0.3, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_row_stats_kernel_handles_rows_of_minus_infinity(small_blocks):
    """A first block all -inf (masked classes) must not turn the online sum-exp into NaN."""
    logits, target = random_problem((3, 40), seed=33)
    logits[:, :20] = float("-inf")
    target = target.clamp(min=20)
    lse, _, z_y = tk.row_stats(logits, target, None, torch.float32)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(z_y, logits.gather(1, target.unsqueeze(1)).squeeze(1))
