"""Conventional label smoothing computed densely, the way the SparseLSR paper's baseline does it.

The smoothed target distribution q_j = eps/C + (1 - eps)[j = y] is built as an N x C tensor,
multiplied with log_softmax and summed over classes. Kept deliberately dense to reproduce the
paper's comparison. Per call it allocates, for M rows of C classes (in float32 for half inputs,
plus one float32 copy of the logits):
  - log_softmax: M x C, kept by autograd for the backward pass;
  - q: M x C, kept by autograd (the product's gradient with respect to log_softmax);
  - q * log_softmax (times the class weights, if given): M x C, freed after the sum.
So the forward pass peaks at about three times the logits, where `F.cross_entropy` needs one (at
smoothing 0, one more: log_softmax with the masked classes' 0 * -inf terms zeroed).
(The paper's own baseline built q from an int64 one-hot, one more M x C tensor of 8-byte integers;
this version builds q in the compute dtype directly.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsr._common import (
    LabelSmoothingLoss,
    as_rows,
    check_reduction,
    check_smoothing,
    check_weight,
    compute_dtype,
    reduce_rows,
)


def dense_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    weight: torch.Tensor | None = None,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """Exact label smoothing, -sum_j w_j q_j log p_j, from a dense N x C target distribution.

    Same arguments and conventions as `F.cross_entropy(..., label_smoothing=smoothing)`, including
    class `weight` (the mean then divides by the sum of the targets' weights).

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> y = torch.tensor([0])
        >>> round(dense_label_smoothing(z, y, smoothing=0.1).item(), 4)
        0.3913
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    rows = as_rows(input, target, ignore_index, validate_targets=validate_targets)
    check_weight(weight, rows.num_classes, rows.logits.device)
    C = rows.num_classes
    log_p = F.log_softmax(rows.logits.to(compute_dtype(rows.logits.dtype)), dim=1)
    q = torch.full_like(log_p, smoothing / C)
    q.scatter_(1, rows.safe_target.unsqueeze(1), 1 - smoothing + smoothing / C)
    if smoothing == 0:  # q_j = 0 off the target: a masked class (log p_j = -inf) must add 0, not 0 * -inf
        log_p = log_p.masked_fill(q == 0, 0.0)
    weight = None if weight is None else weight.to(log_p.dtype)
    row_loss = -((q if weight is None else weight * q) * log_p).sum(dim=1)
    if smoothing == 1:
        # F.cross_entropy computes (1 - eps) nll + eps smooth: at eps = 1 a masked target (log p_y =
        # -inf) gives 0 * inf = NaN there, where q_y = 1/C here gives inf; follow it
        log_p_y = log_p.gather(1, rows.safe_target.unsqueeze(1)).squeeze(1)
        row_loss = torch.where(log_p_y == float("-inf"), float("nan"), row_loss)
    row_weight = None if weight is None else weight[rows.safe_target]
    return reduce_rows(row_loss, rows, reduction, input.dtype, row_weight=row_weight)


class LSRLoss(LabelSmoothingLoss):
    """Dense label smoothing as a module (the paper's baseline): `loss_fn(input, target)` is
    `dense_label_smoothing(input, target, ...)` with the arguments given here.

    Args:
        smoothing: eps in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements, weighted by their targets' weights), "sum" or
            "none" (one loss per element, the target's shape).
        ignore_index: the target value of elements that contribute 0 and leave the mean's denominator.
        weight: optional (C,) class weights, as in `F.cross_entropy`; a buffer, so it follows `.to()`.

    Example:
        >>> loss_fn = LSRLoss(smoothing=0.1)
        >>> loss = loss_fn(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    """

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        weight: torch.Tensor | None = None,
    ):
        super().__init__(smoothing, reduction, ignore_index, weight)

    def forward(self, y_pred: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
        return dense_label_smoothing(
            y_pred, y_target, self.smoothing, self.reduction, self.ignore_index, weight=self.weight
        )
