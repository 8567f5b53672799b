"""What only the Triton kernels have: their real block sizes and their online max, under the interpreter.

The kernels also run every backend-parametrised case of test_fused.py (backend "triton").
TRITON_INTERPRET=1 must be set before Triton is imported (conftest.py and the nox tests session
do); the interpreter is slow, so problems stay small.
"""

import pytest
import torch

from conftest import TRITON_INTERPRETER
from helpers import check, random_problem
from lsr.fused import cpu_options, fused_label_smoothing
from lsr.reference import exact_reference
from test_fused import both, check_nan_rows_for_bad_targets

if not TRITON_INTERPRETER:
    pytest.skip("needs Triton, imported with TRITON_INTERPRET=1", allow_module_level=True)

from lsr.fused import triton_kernels as tk  # noqa: E402


@pytest.mark.usefixtures("poisoned_empty")
def test_kernels_at_the_largest_class_count():
    """C = 262144 with the real block sizes: 32 steps of the row loop, 64 gradient programs per row."""
    logits, target = random_problem((2, 262_144), scale=3.0, seed=31)
    with cpu_options("triton"):
        check(fused_label_smoothing, exact_reference, logits, target, smoothing=0.1, reduction="mean")


def test_row_stats_kernel_handles_rows_of_minus_infinity(monkeypatch):
    """A first block all -inf (masked classes) must not turn the online sum-exp into NaN."""
    monkeypatch.setattr(tk, "STATS_BLOCK", 16)
    logits, target = random_problem((3, 40), seed=33)
    logits[:, :20] = float("-inf")
    target = target.clamp(min=20)
    lse, z_y, _, one_minus_p_y = tk.row_stats(logits, target, None, torch.float32, sparse=True)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1))
    torch.testing.assert_close(z_y, logits.gather(1, target.unsqueeze(1)).squeeze(1))
    p_y = torch.softmax(logits.double(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(one_minus_p_y.double(), 1 - p_y, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("sparse", [False, True])
def test_out_of_range_targets_give_nan_rows_without_reading_out_of_bounds(backend, sparse):
    """validate_targets=False: a target outside [0, C) is never loaded (it read the next row, or the
    previous one), and its row's loss and gradient are NaN, with nothing read back on the host."""
    logits, target = random_problem((6, 37), seed=34)
    target[1], target[2], target[5] = 37, -1, 40  # the next row's first logit, the previous row's last
    fn, ref = both(sparse)
    check_nan_rows_for_bad_targets(
        lambda z, y: fn(z, y, 0.1, "none", validate_targets=False), ref, logits, target
    )
