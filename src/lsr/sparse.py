"""SparseLSR: sparse label smoothing, Raymond et al., TPAMI 2023, equation 15.

With p_y the predicted probability of the target class, xi the smoothing and C the class count:

    L = -(1 - xi + xi/C) log p_y  -  (xi (C-1)/C) log((1 - p_y + 1e-7) / (C - 1))

Exact label smoothing's non-target term -(xi/C) sum_{j != y} log p_j is replaced by its value when
every non-target class shares 1 - p_y equally. By Jensen's inequality that is a lower bound, so
L <= exact label smoothing on every row, and both are minimised at p_y = 1 - xi + xi/C.

The paper's published PyTorch snippet ADDS the second term. That version rewards p_y -> 1 and goes
below zero: it sharpens instead of smoothing. It is kept here only as `seed_snippet_sparse_lsr`, so
that figures can show what it optimises; `sparse_label_smoothing` is the equation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsr._common import (
    LabelSmoothingLoss,
    as_rows,
    check_reduction,
    check_smoothing,
    compute_dtype,
    reduce_rows,
)
from lsr.constants import PAPER_EPS


def _target_log_prob(input, target, ignore_index, validate_targets):
    rows = as_rows(input, target, ignore_index, min_classes=2, validate_targets=validate_targets)
    z = rows.logits.to(compute_dtype(rows.logits.dtype))
    # As the paper does it: an N x C log_softmax, of which only the target column is used.
    log_p_y = F.log_softmax(z, dim=1).gather(1, rows.safe_target.unsqueeze(1)).squeeze(1)
    return rows, log_p_y


def sparse_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """SparseLSR loss (equation 15) with `F.cross_entropy`'s conventions.

    Args:
        input: logits, (C), (N, C) or (N, C, d1, ..., dk), C >= 2; any floating dtype (half types are
            computed in float32 and the result is returned in the input's dtype).
        target: class indices, (), (N) or (N, d1, ..., dk), integer dtype.
        smoothing: xi in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements), "sum" or "none" (the target's shape).
        ignore_index: target value whose elements contribute 0 and leave the mean's denominator.
        validate_targets: check targets are in [0, C); default: on CPU only (no host sync on GPU).

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> y = torch.tensor([0])
        >>> round(sparse_label_smoothing(z, y, smoothing=0.1).item(), 4)
        0.3741
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    rows, log_p_y = _target_log_prob(input, target, ignore_index, validate_targets)
    C = rows.num_classes
    # 1 - p_y as -expm1(log p_y): the equation's 1 - exp(log p_y), without cancellation near p_y = 1.
    one_minus_p_y = -torch.expm1(log_p_y)
    row_loss = -(1 - smoothing + smoothing / C) * log_p_y - (smoothing * (C - 1) / C) * torch.log(
        (one_minus_p_y + PAPER_EPS) / (C - 1)
    )
    return reduce_rows(row_loss, rows, reduction, input.dtype)


def seed_snippet_sparse_lsr(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """The seed repository's published snippet, sign error included. NOT label smoothing.

    It adds (xi (C-1)/C) log(clamp(1 - p_y, 1e-7) / (C - 1)) where equation 15 subtracts it, so its
    minimum is at p_y = 1 with a negative loss. Kept to draw what it optimises; never train with it.
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    rows, log_p_y = _target_log_prob(input, target, ignore_index, None)
    C = rows.num_classes
    row_loss = -(1 - smoothing + smoothing / C) * log_p_y + (smoothing * (C - 1) / C) * torch.log(
        torch.clamp(1 - torch.exp(log_p_y), min=PAPER_EPS) / (C - 1)
    )
    return reduce_rows(row_loss, rows, reduction, input.dtype)


class SparseLSRLoss(LabelSmoothingLoss):
    """SparseLSR as a module, a drop-in for the seed repository's class (now with the paper's sign):
    `loss_fn(input, target)` is `sparse_label_smoothing(input, target, ...)` with the arguments given here.

    Args:
        smoothing: xi in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements), "sum" or "none" (one loss per element, the
            target's shape).
        ignore_index: the target value of elements that contribute 0 and leave the mean's denominator.

    Example:
        >>> loss_fn = SparseLSRLoss(smoothing=0.1)
        >>> loss = loss_fn(torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,)))
        >>> loss.backward()
    """

    def __init__(self, smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = -100):
        super().__init__(smoothing, reduction, ignore_index)

    def forward(self, y_pred: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        return sparse_label_smoothing(y_pred, y_target, self.smoothing, self.reduction, self.ignore_index)
