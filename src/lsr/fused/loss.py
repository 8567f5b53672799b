"""Fused label smoothing: exact (closed form) and SparseLSR (equation 15), O(N) memory beside the logits.

The math, once. Row z of C logits, target y, smoothing eps (xi for SparseLSR), class weights w (all
1 when not given), W = sum_j w_j, p = softmax(z), m = max_j z_j, S = sum_j exp(z_j - m) and
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
A target outside [0, C), which only a caller skipping validation can pass, is never read: the CPU
passes run eagerly raise (`cpu.py`); elsewhere the row's loss and gradient are NaN (s = NaN), with
nothing read back on the host.

The passes run as Triton kernels on CUDA (`triton_kernels.py`) and as compiled or chunked PyTorch
on CPU (`cpu.py`); this module holds the O(N) algebra, the autograd Function and the public API.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.autograd.forward_ad as forward_ad

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


def _row_stats(logits, target, weight, acc_dtype, sparse):
    """lse, z_y, dot (exact) and 1 - p_y (sparse) per row; the one not needed is None."""
    if _uses_triton(logits):
        return _kernels().row_stats(logits, target, weight, acc_dtype, sparse)
    return cpu.row_stats(logits, target, weight, acc_dtype, sparse)


def _gradient(logits, index, weight, lse, p, r, t, inplace):
    if _uses_triton(logits):
        grad = _kernels().gradient(
            logits, index, weight, lse, p, r, t, out=logits if inplace else torch.empty_like(logits)
        )
        if inplace:  # the kernel wrote behind autograd's back: let it see the logits changed
            torch.autograd.graph.increment_version(logits)
        return grad
    grad = cpu.gradient(logits, weight, lse, p, r, inplace)
    return grad.scatter_(1, index.unsqueeze(1), t.to(grad.dtype).unsqueeze(1))


# --- per-row algebra, O(N) ---------------------------------------------------------------------------


def _in_range(target, num_classes):
    """Which targets are in [0, C), and the targets with the others replaced by class 0, so that
    indexing stays in bounds; their rows are made NaN instead (no host read)."""
    ok = (target >= 0) & (target < num_classes)
    return ok, torch.where(ok, target, 0)


def _exact_rows(lse, dot, z_y, w_y, weight, smoothing, num_classes):
    """Row losses and gradient coefficients (alpha, gamma, tau) of exact label smoothing.

    Without weights alpha = 1 for every row: a number, not an (M,) tensor.
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


def _sparse_rows(lse, z_y, one_minus_p_y, smoothing, num_classes):
    """Row losses and gradient coefficients (alpha, gamma, tau) of equation 15."""
    a = 1 - smoothing + smoothing / num_classes
    b = smoothing * (num_classes - 1) / num_classes
    log_p_y = z_y - lse
    row_loss = -a * log_p_y - b * torch.log((one_minus_p_y + PAPER_EPS) / (num_classes - 1))
    c = a - b * torch.exp(log_p_y) / (one_minus_p_y + PAPER_EPS)
    return row_loss, c, 0.0, -c * one_minus_p_y


# --- autograd ------------------------------------------------------------------------------------------

_ALTERNATIVE = "use lsr.native_label_smoothing (F.cross_entropy) or lsr.dense_label_smoothing there"
_NO_DOUBLE_BACKWARD = (
    "the fused losses have no double backward: their gradient is computed in closed form, not recorded "
    f"as a graph, so it cannot be differentiated (create_graph=True, e.g. a gradient penalty); {_ALTERNATIVE}"
)
_NO_FORWARD_AD = (
    "the fused losses have no forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and support "
    f"no torch.func transform (grad, vmap, ...); {_ALTERNATIVE}"
)


class FusedLabelSmoothingFunction(torch.autograd.Function):
    """(M, C) contiguous logits -> the reduced loss; saves lse, alpha and tau per row.

    Non-tensor arguments: smoothing, sparse (equation 15 instead of exact smoothing), reduction,
    out_shape (the shape reduction="none" returns) and inplace (write the gradient over the logits).
    """

    @staticmethod
    def forward(ctx, logits, target, valid, weight, smoothing, sparse, reduction, out_shape, inplace):
        acc_dtype = compute_dtype(logits.dtype)
        num_classes = logits.shape[1]
        lse, z_y, dot, one_minus_p_y = _row_stats(logits, target, weight, acc_dtype, sparse)
        target_ok, index = _in_range(target, num_classes)
        w_y = None if weight is None else weight[index]
        if sparse:
            row_loss, alpha, gamma, tau = _sparse_rows(lse, z_y, one_minus_p_y, smoothing, num_classes)
        else:
            row_loss, alpha, gamma, tau = _exact_rows(lse, dot, z_y, w_y, weight, smoothing, num_classes)
        row_loss = torch.where(valid, torch.where(target_ok, row_loss, float("nan")), 0.0)
        denominator = None
        if reduction == "none":
            loss = row_loss.reshape(out_shape)
        elif reduction == "sum":
            loss = row_loss.sum()
        else:  # mean over valid rows, weighted by w_y as F.cross_entropy does
            denominator = valid.sum().to(acc_dtype) if w_y is None else torch.where(valid, w_y, 0.0).sum()
            # No valid row, or weights all 0: 0/0 in F.cross_entropy, so NaN, gradient included
            denominator = torch.where(denominator == 0, float("nan"), denominator)
            loss = row_loss.sum() / denominator
        per_row_alpha = alpha if torch.is_tensor(alpha) else None
        ctx.save_for_backward(logits, target, valid, weight, lse, tau, denominator, per_row_alpha)
        ctx.alpha = None if torch.is_tensor(alpha) else alpha
        ctx.gamma, ctx.reduction, ctx.inplace = gamma, reduction, inplace
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the caller would differentiate the gradient
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        logits, target, valid, weight, lse, tau, denominator, alpha = ctx.saved_tensors
        alpha = ctx.alpha if alpha is None else alpha
        s = grad_output.to(lse.dtype)
        if ctx.reduction == "none":
            s = s.reshape(-1)
        elif ctx.reduction == "mean":
            s = s / denominator
        target_ok, index = _in_range(target, logits.shape[1])
        s = torch.where(valid, torch.where(target_ok, s, float("nan")), 0.0)
        grad = _gradient(logits, index, weight, lse, s * alpha, s * ctx.gamma, s * tau, ctx.inplace)
        return grad, None, None, None, None, None, None, None, None


# --- functional API ------------------------------------------------------------------------------------


def _fused(input, target, smoothing, reduction, ignore_index, weight, sparse, inplace_backward, validate):
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    rows = as_rows(input, target, ignore_index, min_classes=2 if sparse else 1, validate_targets=validate)
    check_weight(weight, rows.num_classes, rows.logits.device)
    # Checked here, not by a jvp method, which Dynamo cannot trace; torch.func would fail later anyway,
    # with a message about setup_context
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad.unpack_dual(input).tangent is not None
    ):
        raise NotImplementedError(_NO_FORWARD_AD)
    if inplace_backward and input.is_leaf and input.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor with its own gradient (a parameter used "
            "as logits would become its .grad); pass logits computed from it (a layer's output), or "
            "inplace_backward=False"
        )
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
            when that is unsafe. A leaf tensor that requires grad (a parameter) is refused: it would
            become its own gradient. Only (C) and (N, C) inputs with contiguous rows are overwritten;
            other layouts are copied into rows first, and the copy is overwritten.
        validate_targets: check targets are in [0, C); default: on CPU only (no host sync on GPU).
            Unchecked, a target outside [0, C) is never read: it raises on the CPU paths run
            eagerly, and makes its row's loss and gradient NaN where raising would need a host read
            (the Triton kernels, inside `torch.compile`).

    Differentiable once: double backward (create_graph=True), forward-mode AD and torch.func
    transforms raise; `lsr.native_label_smoothing` differentiates to any order.

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
    """`fused_label_smoothing` as a module, a drop-in for `nn.CrossEntropyLoss(label_smoothing=)`:
    `loss_fn(input, target)` with the arguments given here.

    Args:
        smoothing: eps in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements, weighted by their targets' weights), "sum" or
            "none" (one loss per element, the target's shape).
        ignore_index: the target value of elements that contribute 0 and leave the mean's denominator.
        weight: optional (C,) class weights, which get no gradient; a buffer, so it follows `.to()`.
        inplace_backward: write the gradient over the logits, which must not be a leaf tensor (see
            `fused_label_smoothing` and docs/fused.md for when that is safe).
        validate_targets: check targets are in [0, C) (default: on CPU only). False compiles without
            graph breaks (`torch.compile(fullgraph=True)`): the check reads a value on the host.

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
    """`fused_sparse_label_smoothing` as a module, a drop-in for `lsr.SparseLSRLoss`.

    Args:
        smoothing: xi in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements), "sum" or "none" (the target's shape).
        ignore_index: the target value of elements that contribute 0 and leave the mean's denominator.
        inplace_backward: write the gradient over the logits, which must not be a leaf tensor.
        validate_targets: check targets are in [0, C) (default: on CPU only); False for
            `torch.compile(fullgraph=True)`.

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
