"""Fused label smoothing: exact (closed form) and SparseLSR (equation 15), O(N) memory beside the logits.

The math, once. Row z of C logits, target y, smoothing eps (xi for SparseLSR), class weights w (all
1 when not given), W = sum_j w_j, lse = logsumexp(z), p = softmax(z). Three row reductions from one
read of z -- lse, dot = sum_j w_j z_j and z_y -- give either loss:

  exact, PyTorch's `label_smoothing` (q_j = eps/C + (1 - eps)[j = y]; L = -sum_j w_j q_j log p_j):
      L       = A lse - (1 - eps) w_y z_y - (eps/C) dot,          A = (1 - eps) w_y + (eps/C) W
      dL/dz_k = A p_k - (1 - eps) w_y [k = y] - (eps/C) w_k        (p - q without weights)

  SparseLSR, equation 15 (a = 1 - xi + xi/C, b = xi (C-1)/C, log p_y = z_y - lse, and
  1 - p_y = -expm1(log p_y), which keeps its digits as p_y -> 1):
      L       = -a log p_y - b log((1 - p_y + 1e-7) / (C - 1))
      dL/dz_k = c (p_k - [k = y]),                                 c = a - b p_y / (1 - p_y + 1e-7)
  using d log p_y / dz_k = [k = y] - p_k. (The gradient is dense, as exact smoothing's is.)

Both gradients are  alpha p_k - beta [k = y] - gamma w_k  with per-row alpha, beta and a constant
gamma (exact: alpha = A, beta = (1 - eps) w_y, gamma = eps/C; sparse: alpha = beta = c, gamma = 0).
So the forward pass keeps lse, z_y, alpha and beta per row (O(N)), and the backward pass is one
read of z and one write: g_k = p exp(z_k - lse) - r w_k - q [k = y], where (p, q, r) = s (alpha,
beta, gamma) and s is the row's upstream gradient (grad_output, over the mean's denominator, and
0 for an ignored row).

The passes run as Triton kernels on CUDA (`triton_kernels.py`) and as compiled or chunked PyTorch
on CPU (`cpu.py`); this module holds the O(N) algebra, the autograd Function and the public API.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from lsr._common import (
    LabelSmoothingLoss,
    as_rows,
    check_reduction,
    check_smoothing,
    check_weight,
    compute_dtype,
)
from lsr.constants import PAPER_EPS
from lsr.fused import cpu


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _uses_triton(logits: torch.Tensor) -> bool:
    if logits.is_cuda:
        return triton_available()
    return logits.device.type == "cpu" and cpu.cpu_backend(logits.numel()) == "triton"


def _kernels():
    from lsr.fused import triton_kernels  # imports Triton: only here, when a kernel is needed

    return triton_kernels


# --- the two passes over the logits ----------------------------------------------------------------


def _row_stats(logits, target, weight, acc_dtype):
    if _uses_triton(logits):
        return _kernels().row_stats(logits, target, weight, acc_dtype)
    return cpu.row_stats(logits, target, weight, acc_dtype)


def _gradient(logits, target, weight, lse, z_y, p, q, r, inplace):
    if _uses_triton(logits):
        grad = _kernels().gradient(
            logits, target, weight, lse, p, q, r, out=logits if inplace else torch.empty_like(logits)
        )
        if inplace:  # the kernel wrote behind autograd's back: let it see the logits changed
            torch.autograd.graph.increment_version(logits)
        return grad
    grad = cpu.gradient(logits, weight, lse, p, r, inplace)
    # The target column, p p_y - r w_y - q, from the saved z_y (the logits may be overwritten).
    w_y = 1.0 if weight is None else weight[target]
    column = (p * torch.exp(z_y - lse) - r * w_y - q).to(grad.dtype)
    return grad.scatter_(1, target.unsqueeze(1), column.unsqueeze(1))


# --- per-row algebra, O(N) ---------------------------------------------------------------------------


def _exact_rows(lse, dot, z_y, target, weight, smoothing, num_classes):
    """Row losses and gradient coefficients (alpha, beta, gamma) of exact label smoothing.

    Without weights alpha = 1 and beta = 1 - eps for every row: numbers, not (M,) tensors.
    """
    w_y = None if weight is None else weight[target]
    if weight is None:
        alpha, beta = 1.0, 1 - smoothing
    else:
        beta = (1 - smoothing) * w_y
        alpha = beta + (smoothing / num_classes) * weight.sum()
    row_loss = alpha * lse - beta * z_y
    if smoothing > 0:  # skipped at 0, so that a -inf logit (a masked class) gives no 0 * inf
        row_loss = row_loss - (smoothing / num_classes) * dot
    return row_loss, alpha, beta, smoothing / num_classes, w_y


def _sparse_rows(lse, z_y, smoothing, num_classes):
    """Row losses and gradient coefficients (alpha, beta, gamma) of equation 15."""
    a = 1 - smoothing + smoothing / num_classes
    b = smoothing * (num_classes - 1) / num_classes
    log_p_y = z_y - lse
    one_minus_p_y = -torch.expm1(log_p_y)
    row_loss = -a * log_p_y - b * torch.log((one_minus_p_y + PAPER_EPS) / (num_classes - 1))
    c = a - b * torch.exp(log_p_y) / (one_minus_p_y + PAPER_EPS)
    return row_loss, c, c, 0.0, None


# --- autograd ------------------------------------------------------------------------------------------


class FusedLabelSmoothingFunction(torch.autograd.Function):
    """(M, C) contiguous logits -> the reduced loss; saves lse, z_y (and alpha, beta) per row.

    Non-tensor arguments: smoothing, sparse (equation 15 instead of exact smoothing), reduction,
    out_shape (the shape reduction="none" returns) and inplace (write the gradient over the logits).
    """

    @staticmethod
    def forward(ctx, logits, target, valid, weight, smoothing, sparse, reduction, out_shape, inplace):
        acc_dtype = compute_dtype(logits.dtype)
        num_classes = logits.shape[1]
        lse, dot, z_y = _row_stats(logits, target, weight, acc_dtype)
        if sparse:
            row_loss, alpha, beta, gamma, w_y = _sparse_rows(lse, z_y, smoothing, num_classes)
        else:
            row_loss, alpha, beta, gamma, w_y = _exact_rows(
                lse, dot, z_y, target, weight, smoothing, num_classes
            )
        row_loss = torch.where(valid, row_loss, 0.0)
        denominator = None
        if reduction == "none":
            loss = row_loss.reshape(out_shape)
        elif reduction == "sum":
            loss = row_loss.sum()
        else:  # mean over valid rows, weighted by w_y as F.cross_entropy does; NaN when none is valid
            denominator = valid.sum().to(acc_dtype) if w_y is None else torch.where(valid, w_y, 0.0).sum()
            loss = row_loss.sum() / denominator
        per_row = [c if torch.is_tensor(c) else None for c in (alpha, beta)]
        ctx.save_for_backward(logits, target, valid, weight, lse, z_y, denominator, *per_row)
        ctx.constants = [None if torch.is_tensor(c) else c for c in (alpha, beta)]
        ctx.gamma, ctx.reduction, ctx.inplace = gamma, reduction, inplace
        return loss.to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, target, valid, weight, lse, z_y, denominator, *per_row = ctx.saved_tensors
        alpha, beta = (c if c is not None else k for c, k in zip(per_row, ctx.constants, strict=True))
        s = grad_output.to(lse.dtype)
        if ctx.reduction == "none":
            s = s.reshape(-1)
        elif ctx.reduction == "mean":
            s = s / denominator
        s = torch.where(valid, s, 0.0)
        grad = _gradient(logits, target, weight, lse, z_y, s * alpha, s * beta, s * ctx.gamma, ctx.inplace)
        return grad, None, None, None, None, None, None, None, None


# --- functional API ------------------------------------------------------------------------------------


def _fused(input, target, smoothing, reduction, ignore_index, weight, sparse, inplace_backward, validate):
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    rows = as_rows(input, target, ignore_index, min_classes=2 if sparse else 1, validate_targets=validate)
    check_weight(weight, rows.num_classes, rows.logits.device)
    if weight is not None:
        if weight.requires_grad:
            raise ValueError("weight must not require grad: the fused losses give no gradient for it")
        weight = weight.to(compute_dtype(rows.logits.dtype)).contiguous()
    logits = rows.logits.contiguous()  # a view for (N, C) input; (N, C, d1, ...) is already a copy
    return FusedLabelSmoothingFunction.apply(
        logits,
        rows.safe_target,
        rows.valid,
        weight,
        smoothing,
        sparse,
        reduction,
        rows.out_shape,
        bool(inplace_backward),
    )


def fused_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    weight: torch.Tensor | None = None,
    inplace_backward: bool = False,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """Exact label smoothing, `F.cross_entropy(..., label_smoothing=smoothing)`, fused, O(N) memory.

    Args:
        input: logits, (C), (N, C) or (N, C, d1, ..., dk); float16, bfloat16 (computed in float32,
            result and gradient in the input's dtype), float32 or float64.
        target: class indices, (), (N) or (N, d1, ..., dk), integer dtype.
        smoothing: eps in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements, weighted by their targets' weights), "sum" or
            "none" (the target's shape).
        ignore_index: target value whose elements contribute 0 and leave the mean's denominator.
        weight: (C,) class weights, PyTorch's convention; they receive no gradient.
        inplace_backward: write the gradient into the logits' memory instead of a new tensor (saves
            N x C bytes). The input then holds the gradient after backward: see docs/fused.md for
            when that is unsafe. Only (C) and (N, C) inputs with contiguous rows are overwritten;
            other layouts are copied into rows first, and the copy is overwritten.
        validate_targets: check targets are in [0, C); default: on CPU only (no host sync on GPU).

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
        >>> loss = fused_label_smoothing(z, torch.tensor([0]), smoothing=0.1)
        >>> round(loss.item(), 4)
        0.3913
        >>> loss.backward()
        >>> [round(g, 4) for g in z.grad[0].tolist()]
        [-0.1477, 0.142, 0.0058]
    """
    return _fused(
        input, target, smoothing, reduction, ignore_index, weight, False, inplace_backward, validate_targets
    )


def fused_sparse_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    inplace_backward: bool = False,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """SparseLSR (equation 15, as `lsr.sparse_label_smoothing`), fused, O(N) memory, C >= 2.

    Arguments as `fused_label_smoothing`, without class weights (equation 15 has none).

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> round(fused_sparse_label_smoothing(z, torch.tensor([0]), smoothing=0.1).item(), 4)
        0.3741
    """
    return _fused(
        input, target, smoothing, reduction, ignore_index, None, True, inplace_backward, validate_targets
    )


# --- modules -------------------------------------------------------------------------------------------


class FusedLSRLoss(LabelSmoothingLoss):
    """`fused_label_smoothing` as a module, a drop-in for `nn.CrossEntropyLoss(label_smoothing=)`.

    With validate_targets=False it compiles without graph breaks (`torch.compile(fullgraph=True)`):
    checking targets on CPU reads a tensor's value on the host.

    Example:
        >>> loss_fn = FusedLSRLoss(smoothing=0.1)
        >>> loss = loss_fn(torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,)))
        >>> loss.backward()
    """

    sparse = False  # equation 15 instead of exact smoothing

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        weight: torch.Tensor | None = None,
        inplace_backward: bool = False,
        validate_targets: bool | None = None,
    ):
        super().__init__(smoothing, reduction, ignore_index)
        self.inplace_backward = inplace_backward
        self.validate_targets = validate_targets
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _fused(
            input,
            target,
            self.smoothing,
            self.reduction,
            self.ignore_index,
            self.weight,
            self.sparse,
            self.inplace_backward,
            self.validate_targets,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, inplace_backward={self.inplace_backward}"


class FusedSparseLSRLoss(FusedLSRLoss):
    """`fused_sparse_label_smoothing` as a module, a drop-in for `lsr.SparseLSRLoss` (no class weights).

    Example:
        >>> loss_fn = FusedSparseLSRLoss(smoothing=0.1)
        >>> loss = loss_fn(torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,)))
        >>> loss.backward()
    """

    sparse = True

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        inplace_backward: bool = False,
        validate_targets: bool | None = None,
    ):
        super().__init__(smoothing, reduction, ignore_index, None, inplace_backward, validate_targets)
