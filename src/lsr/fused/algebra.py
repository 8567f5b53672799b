"""The per-row algebra of the fused losses, O(N): the math, once, and the functions that compute it.

Row z of C logits, target y, smoothing eps (xi for SparseLSR), class weights w (all 1 when not
given), W = sum_j w_j, p = softmax(z), m = max_j z_j, S = sum_j exp(z_j - m) and
lse = m + log S = logsumexp(z). One read of z gives the row reductions either loss needs: lse, z_y and
  - for exact smoothing, dot = sum_j w_j z_j;
  - for SparseLSR, 1 - p_y = (sum over j != y of exp(z_j - m)) / S, from the non-target terms, so
    that it keeps its digits however close p_y is to 1. (Formed as -expm1(z_y - lse), it inherits
    the absolute rounding error of z_y - lse, about eps |lse|, as a relative error of that over
    1 - p_y: in float32 the loss was 1.6811 instead of 1.5166 at z = [20, 5, 4], y = 0, xi = 0.15.)

  exact, PyTorch's `label_smoothing` (q_j = eps/C + (1 - eps)[j = y]; L = -sum_j w_j q_j log p_j):
      L       = A lse - (1 - eps) w_y z_y - (eps/C) dot,          A = (1 - eps) w_y + (eps/C) W
      dL/dz_k = A p_k - (1 - eps) w_y [k = y] - (eps/C) w_k        (p - q without weights)

  SparseLSR, equation 15 (a = 1 - xi + xi/C, b = xi (C-1)/C, log p_y = z_y - lse):
      L       = -a log p_y - b log((1 - p_y + 1e-7) / (C - 1))
      dL/dz_k = c (p_k - [k = y]),                                 c = a - b p_y / (1 - p_y + 1e-7)
  using d log p_y / dz_k = [k = y] - p_k. (The gradient is dense, as exact smoothing's is.)

Off the target column both gradients are  alpha p_k - gamma w_k,  with a per-row alpha and a constant
gamma (exact: alpha = A, gamma = eps/C; sparse: alpha = c, gamma = 0); on it, a per-row tau (exact:
tau = A p_y - (1 - eps + eps/C) w_y; sparse: tau = -c (1 - p_y), from the 1 - p_y above: c p_y - c
would lose its digits as c grows). So the forward pass keeps lse, alpha and tau per row (O(N)), and
the backward pass is one read of z and one write: g_k = p exp(z_k - lse) - r w_k off the target and
g_y = t, where (p, r, t) = s (alpha, gamma, tau) and s is the row's upstream gradient (grad_output,
over the mean's denominator; 0 for an ignored row).

What `F.cross_entropy` does at the edges, these do too: a mean whose targets' weights sum to 0 is
NaN, gradient included (0/0); at eps = 0 a masked class (z_j = -inf) adds nothing (no 0 * inf).
A target outside [0, C), which only a caller skipping validation can pass, is never read: the
plain-PyTorch CPU passes run eagerly raise (`cpu.py`); elsewhere the row's loss and gradient are NaN
(s = NaN), with nothing read back on the host.

On CPU, where the C++ kernels run, a forward or backward is one call (csrc/fused.cpp's
`loss_forward`, `loss_backward`, `onepass_loss`): the algebra below in C++ (`row_coefficients`) around
the sweeps, since as ~40 small torch ops between passes it cost more than a pass over a few million
logits.

The one-pass mode (gradient_in_forward=True). The forward pass knows each row's upstream gradient
s for a backward of 1 before it reads the logits (1/denominator for "mean", 1 for "sum" and "none",
0 for an ignored row, NaN for a target outside [0, C)), so it can write the gradient of
sum_i s_i L_i over the logits while each row is at hand, and keep nothing else. Its kernels,
`triton_kernels.forward_gradient` and `cpp.forward_gradient` (or `cpu.forward_gradient`), follow this contract:
(M, C) logits, (M,) targets in [0, C), weights or None and s (`scale`) in the compute dtype -> (M,)
row losses L (unscaled), the logits overwritten with g = s dL/dz: the formulas above, with
p_k = e_k / S and e_k = exp(z_k - m) computed once per logit:
  off the target  g_k = s alpha p_k - s gamma w_k,     on it  g_y = s tau.
The backward pass then only multiplies by the upstream gradient when it is not 1, decided where the
number lives (on a GPU by a kernel that reads it there: no host synchronisation).

Here: `in_range`, `exact_rows` and `sparse_rows` (a row's loss and (alpha, gamma, tau) from its
reductions), `mean_denominator`, `reduce_rows` and `row_upstream`. The passes over the logits that
feed them are in `passes.py`; the one-pass kernels apply them to each row as it is read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lsr.constants import PAPER_EPS


def in_range(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which targets are in [0, C), and the targets with the others replaced by class 0, so that
    indexing stays in bounds; their rows are made NaN instead (no host read).

    Example:
        >>> in_range(torch.tensor([2, 5, -1]), 3)
        (tensor([ True, False, False]), tensor([2, 0, 0]))
    """
    ok = (target >= 0) & (target < num_classes)
    return ok, torch.where(ok, target, 0)


def exact_rows(lse, dot, z_y, w_y, weight, smoothing: float, num_classes: int):
    """Row losses and gradient coefficients (alpha, gamma, tau) of exact label smoothing.

    w_y and weight are None without weights; then alpha = 1 for every row: a number, not an (M,)
    tensor. dot is not read at smoothing 0 (it may be None there).

    Example, one row of z = [2, 0.5, -1], target 0, eps = 0.1:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> loss, alpha, gamma, tau = exact_rows(z.logsumexp(1), z.sum(1), z[:, 0], None, None, 0.1, 3)
        >>> round(loss.item(), 4), alpha, round(tau.item(), 4)  # tau: the target column's gradient
        (0.3913, 1.0, -0.1477)
    """
    gamma = smoothing / num_classes
    if weight is None:
        alpha, beta, w_y = 1.0, 1 - smoothing, 1.0
    else:
        beta = (1 - smoothing) * w_y
        alpha = beta + gamma * weight.sum()
    row_loss = alpha * lse - beta * z_y
    if smoothing > 0:  # skipped at 0, so that a -inf logit (a masked class) gives no 0 * inf
        row_loss = row_loss - gamma * dot
    tau = alpha * torch.exp(z_y - lse) - (1 - smoothing + gamma) * w_y
    return row_loss, alpha, gamma, tau


def sparse_rows(lse, z_y, one_minus_p_y, smoothing: float, num_classes: int):
    """Row losses and gradient coefficients (alpha, gamma, tau) of equation 15; gamma is 0.

    Example, the row whose loss loses its digits if 1 - p_y is formed as 1 - exp(z_y - lse):
        >>> z = torch.tensor([[20.0, 5.0, 4.0]])
        >>> lse, e = z.logsumexp(1), (z - 20).exp()
        >>> loss, *_ = sparse_rows(lse, z[:, 0], e[:, 1:].sum(1) / e.sum(1), 0.15, 3)
        >>> round(loss.item(), 4)
        1.5166
    """
    a = 1 - smoothing + smoothing / num_classes
    b = smoothing * (num_classes - 1) / num_classes
    log_p_y = z_y - lse
    row_loss = -a * log_p_y - b * torch.log((one_minus_p_y + PAPER_EPS) / (num_classes - 1))
    c = a - b * torch.exp(log_p_y) / (one_minus_p_y + PAPER_EPS)
    return row_loss, c, 0.0, -c * one_minus_p_y


def mean_denominator(valid: torch.Tensor, w_y: torch.Tensor | None, acc_dtype: torch.dtype) -> torch.Tensor:
    """The mean's denominator: valid rows, weighted by w_y as F.cross_entropy does; NaN when it is 0
    (no valid row, or weights all 0: 0/0 in F.cross_entropy, so NaN, gradient included)."""
    denominator = valid.sum().to(acc_dtype) if w_y is None else torch.where(valid, w_y, 0.0).sum()
    return torch.where(denominator == 0, float("nan"), denominator)


def reduce_rows(row_loss, valid, target_ok, reduction: str, out_shape, denominator) -> torch.Tensor:
    """Ignored rows 0, rows with a target outside [0, C) NaN, then the reduction ("mean" over
    `denominator`, "sum", or "none": the rows laid out as `out_shape`)."""
    row_loss = torch.where(valid, torch.where(target_ok, row_loss, float("nan")), 0.0)
    if reduction == "none":
        return row_loss.reshape(out_shape)
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / denominator


def row_upstream(grad_output, reduction: str, denominator, valid, target_ok) -> torch.Tensor:
    """Each row's upstream gradient s: grad_output (per row for "none", over the mean's denominator
    for "mean"); 0 for ignored rows, NaN for rows with a target outside [0, C)."""
    s = grad_output
    if reduction == "none":
        s = s.reshape(-1)
    elif reduction == "mean":
        s = s / denominator
    return torch.where(valid, torch.where(target_ok, s, float("nan")), 0.0)


class ReducedRows(NamedTuple):
    """What a forward pass keeps from the row statistics: the reduced loss, the gradient's coefficients
    (alpha, gamma, tau), the mean's denominator (None for other reductions) and which targets are in
    [0, C)."""

    loss: torch.Tensor
    alpha: torch.Tensor | float
    gamma: float
    tau: torch.Tensor
    denominator: torch.Tensor | None
    target_ok: torch.Tensor


def reduce_from_stats(
    lse,
    z_y,
    third,
    target,
    valid,
    weight,
    smoothing: float,
    num_classes: int,
    sparse: bool,
    reduction: str,
    out_shape,
) -> ReducedRows:
    """The forward pass after the row statistics (`third`: dot for exact smoothing, 1 - p_y for
    SparseLSR): row losses and coefficients, ignored rows 0, rows with a target outside [0, C) NaN,
    then the reduction. The fused and the vocab-parallel losses share it: they differ only in how
    the statistics are gathered."""
    target_ok, index = in_range(target, num_classes)
    w_y = None if weight is None else weight[index]
    if sparse:
        row_loss, alpha, gamma, tau = sparse_rows(lse, z_y, third, smoothing, num_classes)
    else:
        row_loss, alpha, gamma, tau = exact_rows(lse, third, z_y, w_y, weight, smoothing, num_classes)
    denominator = mean_denominator(valid, w_y, lse.dtype) if reduction == "mean" else None
    loss = reduce_rows(row_loss, valid, target_ok, reduction, out_shape, denominator)
    return ReducedRows(loss, alpha, gamma, tau, denominator, target_ok)
