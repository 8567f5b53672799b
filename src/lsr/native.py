"""PyTorch's own label smoothing, `F.cross_entropy(label_smoothing=)`, behind the project's checks.

The arithmetic is PyTorch's, untouched (half inputs stay in their dtype, as a user calling
`F.cross_entropy` would get). Only the argument checks are added, so that bad input gets the same
errors here as from every other implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lsr._common import check_input, check_reduction, check_smoothing, check_weight


def native_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    weight: torch.Tensor | None = None,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(input, target, weight, ignore_index=, reduction=, label_smoothing=smoothing)`.

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> y = torch.tensor([0])
        >>> round(native_label_smoothing(z, y, smoothing=0.1).item(), 4)
        0.3913
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    batched, _, _ = check_input(input, target, ignore_index, validate_targets=validate_targets)
    check_weight(weight, batched.shape[1], input.device)
    if weight is not None:
        weight = weight.to(input.dtype)  # F.cross_entropy wants the input's dtype; the others convert too
    return F.cross_entropy(
        input,
        target.long(),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=smoothing,
    )
