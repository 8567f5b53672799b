"""Float64 references written from the definitions, for tests and the benchmark's correctness gate.

Deliberately naive and independent of the implementations (no shared layout or reduction code):
exact label smoothing is -sum_j w_j q_j log p_j with q built explicitly; SparseLSR is equation 15
typed as printed. Both are differentiable, so their autograd gradients are references too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(input, target, ignore_index):
    z = input.double()
    if z.dim() == 1:
        z, target = z.unsqueeze(0), target.unsqueeze(0)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    return z, valid, safe


def _reduce(per_element, row_weight, valid, reduction, out_shape):
    per_element = torch.where(valid, per_element, 0.0)  # not a product: an ignored inf would give NaN
    if reduction == "none":
        return per_element.reshape(out_shape)
    if reduction == "sum":
        return per_element.sum()
    total_weight = (row_weight * valid).sum()
    # None valid, or their weights all 0: NaN, as F.cross_entropy's 0/0 (a positive sum / 0 is inf)
    return per_element.sum() / torch.where(total_weight == 0, float("nan"), total_weight)


def exact_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum_j w_j q_j log p_j, q_j = smoothing/C + (1 - smoothing)[j = y], in float64."""
    z, valid, safe = _prepare(input, target, ignore_index)
    C = z.shape[1]
    q = (1 - smoothing) * F.one_hot(safe, C).movedim(-1, 1).double() + smoothing / C
    w = torch.ones(C, dtype=torch.float64, device=z.device) if weight is None else weight.double()
    w_b = w.reshape((1, C) + (1,) * (z.dim() - 2))
    per_element = -(w_b * q * torch.log_softmax(z, dim=1)).sum(dim=1)
    return _reduce(per_element, w[safe], valid, reduction, target.shape)


def sparse_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Equation 15 as printed, in float64:
    -(1 - xi + xi/C) log p_y - (xi (C-1)/C) log((1 - p_y + 1e-7) / (C - 1))."""
    if weight is not None:
        raise ValueError("SparseLSR has no class-weighted form")
    z, valid, safe = _prepare(input, target, ignore_index)
    C, xi = z.shape[1], smoothing
    log_p_y = torch.log_softmax(z, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    p_y = torch.exp(log_p_y)
    per_element = -(1 - xi + xi / C) * log_p_y - (xi * (C - 1) / C) * torch.log((1 - p_y + 1e-7) / (C - 1))
    return _reduce(per_element, torch.ones_like(per_element), valid, reduction, target.shape)
