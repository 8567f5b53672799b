"""Argument checks, layout and reduction shared by every loss, with `F.cross_entropy`'s conventions.

Every loss flattens its input to rows of logits, computes one loss per row, and reduces it here, so
that shapes, `ignore_index`, `reduction` and dtypes mean the same thing for all implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsr.types import HALF_DTYPES, REDUCTIONS, Reduction


def check_smoothing(smoothing: float) -> float:
    """Return `smoothing` as a float, or raise if it is not a number in [0, 1]."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise TypeError(f"smoothing must be a float in [0, 1], got {type(smoothing).__name__}")
    if not (0.0 <= smoothing <= 1.0):  # also rejects NaN
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    return float(smoothing)


def check_reduction(reduction: str) -> Reduction:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


@dataclass(frozen=True)
class Rows:
    """Logits as (M, C) rows with their (M,) targets, and how to give results the caller's shape."""

    logits: torch.Tensor  # (M, C), caller's dtype and device; a view where the layout allows
    target: torch.Tensor  # (M,), int64
    valid: torch.Tensor  # (M,) bool: target != ignore_index
    safe_target: torch.Tensor  # (M,) int64: target with ignored rows replaced by class 0
    out_shape: torch.Size  # the target's shape, which reduction="none" returns
    num_classes: int


def check_input(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    *,
    min_classes: int = 1,
    validate_targets: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """Check `input` and `target` as `F.cross_entropy` would, with errors that name the problem.

    input: (C), (N, C) or (N, C, d1, ..., dk) floating point logits.
    target: (), (N) or (N, d1, ..., dk) integer class indices, or `ignore_index`.
    validate_targets: check every target is in [0, C) or `ignore_index`. None (the default) checks on
        CPU and skips on other devices, where reading the answer back would synchronise the host.
    Returns input and target with a batch dimension added to an unbatched sample, and the shape
    that reduction="none" returns (the caller's target shape).
    """
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensor")
    if not input.is_floating_point():
        raise TypeError(f"input (logits) must be a floating point tensor, got dtype {input.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must be an integer tensor of class indices, got dtype {target.dtype}"
            " (probability targets are not supported)"
        )
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: expected (C), (N, C) or (N, C, d1, ...)")
    out_shape = target.shape
    if input.dim() == 1:  # one unbatched sample, as F.cross_entropy accepts
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(out_shape)} does not match input shape {tuple(input.shape)}: "
            f"expected target shape {expected}"
        )
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    num_classes = input.shape[1]
    if num_classes < min_classes:
        raise ValueError(f"this loss needs at least {min_classes} classes, got C={num_classes}")
    if validate_targets is None:
        validate_targets = target.device.type == "cpu"
    if validate_targets:
        check_targets(target, num_classes, ignore_index)
    return input, target, out_shape


def check_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise unless every target is in [0, num_classes) or ignore_index (reads a value on the host)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target value {value} is out of range for C={num_classes} classes: targets must be in "
            f"[0, {num_classes}) or equal ignore_index={ignore_index}"
        )


def row_layout(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    *,
    min_classes: int = 1,
    validate_targets: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """`check_input`, then the logits as (M, C) rows, class dimension last, the targets as (M,) int64,
    and the shape reduction="none" returns."""
    input, target, out_shape = check_input(
        input, target, ignore_index, min_classes=min_classes, validate_targets=validate_targets
    )
    num_classes = input.shape[1]
    # A view for (N, C) input; (N, C, d1, ...) is copied once into rows, as F.cross_entropy does.
    logits = input.movedim(1, -1).reshape(-1, num_classes) if input.dim() > 2 else input
    return logits, target.reshape(-1).long(), out_shape


def as_rows(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    *,
    min_classes: int = 1,
    validate_targets: bool | None = None,
) -> Rows:
    """`row_layout`, with the rows' masks."""
    logits, target, out_shape = row_layout(
        input, target, ignore_index, min_classes=min_classes, validate_targets=validate_targets
    )
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    return Rows(logits, target, valid, safe_target, out_shape, logits.shape[1])


def check_weight(weight: torch.Tensor | None, num_classes: int, device: torch.device) -> None:
    """Class weights, as in `F.cross_entropy`: a floating (C,) tensor on the input's device."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError("weight must be a floating point tensor of one weight per class")
    if weight.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), one per class, got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but input is on {device}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def reduce_rows(
    row_loss: torch.Tensor,
    rows: Rows,
    reduction: str,
    out_dtype: torch.dtype,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero ignored rows and reduce as `F.cross_entropy` does.

    row_loss: (M,) per-row loss, already multiplied by `row_weight` where weights are used.
    row_weight: (M,) weight of each row's target class; the mean divides by their sum over valid
        rows (by the count of valid rows without weights). A mean over no valid rows, or over targets
        whose weights are all 0, is NaN, gradient included, as in `F.cross_entropy` (0/0 there).
    """
    row_loss = torch.where(rows.valid, row_loss, torch.zeros_like(row_loss))
    if reduction == "none":
        return row_loss.reshape(rows.out_shape).to(out_dtype)
    total = row_loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    if row_weight is None:
        denominator = rows.valid.sum().to(total.dtype)
    else:
        denominator = torch.where(rows.valid, row_weight, torch.zeros_like(row_weight)).sum()
    denominator = torch.where(denominator == 0, float("nan"), denominator)
    return (total / denominator).to(out_dtype)


class LabelSmoothingLoss(torch.nn.Module):
    """Base of the loss modules: the arguments every loss takes, checked once at construction."""

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.smoothing = check_smoothing(smoothing)
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight)  # class weights, where the loss takes them: follows .to()

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
