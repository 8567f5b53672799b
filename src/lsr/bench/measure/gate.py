"""The correctness gate: no case is timed before its loss and gradient agree with the float64 reference.

The implementation runs on the whole batch, with the case's ignored targets and class weights, so
size-dependent bugs show; only a few rows, spread over the batch, are recomputed in float64 (rows are
independent under reduction "none"). An implementation that writes into its logits, in its backward
or already in its forward (`inplace_backward`, as Liger-Kernel's losses; `gradient_in_forward`, the
one-pass mode), gets a fresh copy of them for every call; the float64 rows are taken before any call.
"""

from __future__ import annotations

import torch

from lsr.bench.data import IGNORE_INDEX, Case
from lsr.bench.measure.problem import Problem
from lsr.registry import Implementation
from lsr.types import LossFn


class GateFailure(AssertionError):
    """The implementation's loss or gradient disagrees with the float64 reference."""


GATE_ROWS = 32
GATE_TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def gate_rows(batch: int, device: torch.device) -> torch.Tensor:
    """The rows recomputed in float64: at most GATE_ROWS, spread evenly over the batch, ends included."""
    rows = torch.linspace(0, batch - 1, min(GATE_ROWS, batch)).round().long().unique()
    return rows.to(device)


def relative_norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| in float64 (Frobenius norms): a gradient's error against its reference."""
    return float((got.double() - want).norm() / (want.norm() + 1e-12))


def mean_denominator(target: torch.Tensor, weight: torch.Tensor | None) -> float:
    """What reduction "mean" divides the summed loss by: the number of rows not ignored, or, with class
    weights, the sum of their targets' weights (as F.cross_entropy)."""
    valid = target != IGNORE_INDEX
    if weight is None:
        return float(valid.sum())
    safe = torch.where(valid, target, torch.zeros_like(target))
    return float((weight.double()[safe] * valid).sum())


def check_against_reference(
    case: Case, problem: Problem, impl: Implementation, loss_fn: LossFn | None = None
) -> float:
    """Compare loss and gradient of a few rows with the float64 reference; return the largest
    relative error; raise GateFailure past the dtype's tolerance.

    The timed reduction, "mean", is checked against the per-row losses ("none", ignored rows 0)
    summed over the denominator (`mean_denominator`), and its gradient, times that denominator,
    against the reference's per-row gradient (0 on ignored rows). An implementation that overwrites
    its logits without saying so (`inplace_backward` or `gradient_in_forward`) fails: its calls share
    the logits.
    """
    loss_fn = loss_fn or impl.loss
    logits, target, options = problem.logits, problem.target, problem.options
    rows = gate_rows(case.batch, logits.device)
    sub = logits.detach()[rows].double().requires_grad_(True)  # before any call that may overwrite them

    writes_logits = impl.overwrites_logits

    def fresh() -> torch.Tensor:  # the logits a call gets: a copy of its own where it writes into them
        return problem.copy().logits if writes_logits else logits

    per_row_all = loss_fn(fresh(), target, case.smoothing, "none", **options).detach().double()
    per_row = per_row_all[rows]
    x = fresh()
    mean = loss_fn(x, target, case.smoothing, "mean", **options)
    mean_value = float(mean.detach().double())
    (grad,) = torch.autograd.grad(mean, x)
    denominator = mean_denominator(target, problem.weight)
    grad = grad.detach()[rows].double() * denominator  # the mean's gradient is the sum's over it
    del x, mean
    ref_per_row = impl.reference(sub, target[rows], case.smoothing, "none", **options)
    (ref_grad,) = torch.autograd.grad(ref_per_row.sum(), sub)
    ref_per_row = ref_per_row.detach()
    tol = GATE_TOLERANCE[case.dtype]
    loss_err = float(((per_row - ref_per_row).abs() / (ref_per_row.abs() + 1)).max())
    mean_of_rows = float(per_row_all.sum()) / denominator
    loss_err = max(loss_err, abs(mean_value - mean_of_rows) / (abs(mean_of_rows) + 1))
    grad_err = relative_norm_error(grad, ref_grad)
    if not (loss_err <= tol and grad_err <= tol):  # also catches NaN
        raise GateFailure(
            f"disagrees with the float64 reference: loss error {loss_err:.2e}, gradient error {grad_err:.2e} "
            f"(tolerance {tol:.0e})"
        )
    return max(loss_err, grad_err)
