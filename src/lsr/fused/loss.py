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

The one-pass mode (gradient_in_forward=True). The forward pass knows each row's upstream gradient
s for a backward of 1 before it reads the logits (1/denominator for "mean", 1 for "sum" and "none",
0 for an ignored row, NaN for a target outside [0, C)), so it can write the gradient of
sum_i s_i L_i over the logits while each row is at hand, and keep nothing else. Both kernels,
`triton_kernels.forward_gradient` and `onepass_cpu.forward_gradient`, follow this contract:
(M, C) logits, (M,) targets in [0, C), weights or None and s in the compute dtype -> (M,) row
losses L (unscaled), the logits overwritten with g = s dL/dz. Per row, with e_k = exp(z_k - m) and
p = e/S (w = 1 without weights):
  exact:  L = A lse - (1 - eps) w_y z_y - (eps/C) sum_j w_j z_j,    A = (1 - eps) w_y + (eps/C) W
          g_k = s (A p_k - (eps/C) w_k - (1 - eps) w_y [k = y])     (at eps = 0 no dot term)
  sparse: 1 - p_y = (sum over j != y of e_j) / S,  c = a - b p_y / (1 - p_y + 1e-7),
          L = -a (z_y - lse) - b log((1 - p_y + 1e-7) / (C - 1))
          g_k = s c p_k off the target,   g_y = -s c (1 - p_y)
The backward pass then only multiplies by the upstream gradient when it is not 1, decided where the
number lives (on a GPU by a kernel that reads it there: no host synchronisation).
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


def _forward_gradient(logits, index, weight, scale, smoothing, sparse):
    """The one-pass contract (module docstring): row losses; the gradient written over the logits."""
    if _uses_triton(logits):
        row_loss = _kernels().forward_gradient(logits, index, weight, scale, smoothing, sparse)
    else:
        from lsr.fused import onepass_cpu  # C++ on CPU; plain PyTorch when traced or on other devices

        row_loss = onepass_cpu.forward_gradient(logits, index, weight, scale, smoothing, sparse)
    # Written behind autograd's back: any op that saved the logits for its backward now raises there
    torch.autograd.graph.increment_version(logits)
    return row_loss


def _scale_by_upstream(grad, upstream):
    """grad *= upstream (0-d, or one per row), in place, skipped where the upstream gradient is 1."""
    if _uses_triton(grad):
        return _kernels().scale_rows(grad, upstream)  # decided on the device: no host synchronisation
    if upstream.dim() == 0:
        # On CPU reading the number costs nothing; on a GPU without Triton it would synchronise
        if grad.device.type == "cpu" and not torch.compiler.is_compiling() and upstream.item() == 1:
            return grad
        return grad.mul_(upstream)
    return grad.mul_(upstream.unsqueeze(1))


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


def _mean_denominator(valid, w_y, acc_dtype):
    """The mean's denominator: valid rows, weighted by w_y as F.cross_entropy does; NaN when it is 0
    (no valid row, or weights all 0: 0/0 in F.cross_entropy, so NaN, gradient included)."""
    denominator = valid.sum().to(acc_dtype) if w_y is None else torch.where(valid, w_y, 0.0).sum()
    return torch.where(denominator == 0, float("nan"), denominator)


def _reduce(row_loss, valid, target_ok, reduction, out_shape, denominator):
    """Ignored rows 0, rows with a target outside [0, C) NaN, then the reduction."""
    row_loss = torch.where(valid, torch.where(target_ok, row_loss, float("nan")), 0.0)
    if reduction == "none":
        return row_loss.reshape(out_shape)
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / denominator


def _row_upstream(grad_output, reduction, denominator, valid, target_ok):
    """Each row's upstream gradient s: grad_output (per row for "none", over the mean's denominator
    for "mean"); 0 for ignored rows, NaN for rows with a target outside [0, C)."""
    s = grad_output
    if reduction == "none":
        s = s.reshape(-1)
    elif reduction == "mean":
        s = s / denominator
    return torch.where(valid, torch.where(target_ok, s, float("nan")), 0.0)


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
        denominator = _mean_denominator(valid, w_y, acc_dtype) if reduction == "mean" else None
        loss = _reduce(row_loss, valid, target_ok, reduction, out_shape, denominator)
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
        target_ok, index = _in_range(target, logits.shape[1])
        s = _row_upstream(grad_output.to(lse.dtype), ctx.reduction, denominator, valid, target_ok)
        grad = _gradient(logits, index, weight, lse, s * alpha, s * ctx.gamma, s * tau, ctx.inplace)
        return grad, None, None, None, None, None, None, None, None


_ONE_BACKWARD = (
    "backward ran a second time through a loss computed with gradient_in_forward=True: its gradient "
    "lives in the logits' memory and the first backward handed it on (retain_graph=True cannot repeat "
    "it); compute the loss again, or use gradient_in_forward=False"
)


class FusedOnePassFunction(torch.autograd.Function):
    """(M, C) contiguous logits -> the reduced loss; the forward pass overwrites the logits with the
    gradient for an upstream gradient of 1, the backward pass returns that memory, scaled only where
    the upstream gradient is not 1. Nothing else is saved.

    Non-tensor arguments: smoothing, sparse, reduction and out_shape, as FusedLabelSmoothingFunction.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, weight, smoothing, sparse, reduction, out_shape):
        acc_dtype = compute_dtype(logits.dtype)
        target_ok, index = _in_range(target, logits.shape[1])
        w_y = None if weight is None else weight[index]
        denominator = _mean_denominator(valid, w_y, acc_dtype) if reduction == "mean" else None
        # Each row's share of a backward of 1: 1/denominator (mean) or 1; 0 ignored, NaN bad target
        share = 1.0 if denominator is None else 1 / denominator
        scale = torch.where(valid, torch.where(target_ok, share, float("nan")), 0.0).to(acc_dtype)
        row_loss = _forward_gradient(logits, index, weight, scale, smoothing, sparse)
        loss = _reduce(row_loss, valid, target_ok, reduction, out_shape, denominator)
        ctx.save_for_backward(logits)  # the gradient now; autograd checks nothing wrote it since
        ctx.reduction, ctx.used = reduction, False
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the caller would differentiate the gradient
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        if ctx.used:  # the first backward scaled and handed on the gradient
            raise RuntimeError(_ONE_BACKWARD)
        ctx.used = True
        (grad,) = ctx.saved_tensors
        upstream = grad_output.reshape(-1) if ctx.reduction == "none" else grad_output
        return _scale_by_upstream(grad, upstream), None, None, None, None, None, None, None


# --- functional API ------------------------------------------------------------------------------------


def _fused_options_conflict():
    raise ValueError(
        "gradient_in_forward=True and inplace_backward=True: choose one. gradient_in_forward already "
        "writes the gradient over the logits (in the forward pass); inplace_backward does it in the "
        "backward pass of the two-pass mode"
    )


def _fused(
    input, target, smoothing, reduction, ignore_index, weight, sparse, inplace_backward, validate, one_pass
):
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    if one_pass and inplace_backward:
        _fused_options_conflict()
    rows = as_rows(input, target, ignore_index, min_classes=2 if sparse else 1, validate_targets=validate)
    check_weight(weight, rows.num_classes, rows.logits.device)
    # Checked here, not by a jvp method, which Dynamo cannot trace; torch.func would fail later anyway,
    # with a message about setup_context
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad.unpack_dual(input).tangent is not None
    ):
        raise NotImplementedError(_NO_FORWARD_AD)
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and input.is_leaf and needs_grad:
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor with its own gradient (a parameter used "
            "as logits would become its .grad); pass logits computed from it (a layer's output), or "
            "inplace_backward=False"
        )
    if one_pass and input.is_leaf and needs_grad:
        raise ValueError(
            "gradient_in_forward=True would overwrite a leaf tensor with its own gradient during the "
            "forward pass (a parameter used as logits would become its .grad); pass logits computed from "
            "it (a layer's output), or gradient_in_forward=False"
        )
    if weight is not None:
        if weight.requires_grad:
            raise ValueError("weight must not require grad: the fused losses give no gradient for it")
        weight = weight.to(compute_dtype(rows.logits.dtype)).contiguous()
    logits = rows.logits.contiguous()  # a view for (N, C) input; (N, C, d1, ...) is already a copy
    if one_pass and needs_grad:  # without a backward to come the logits are only read, as by default
        return FusedOnePassFunction.apply(
            logits, rows.safe_target, rows.valid, weight, smoothing, sparse, reduction, rows.out_shape
        )
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
    gradient_in_forward: bool = False,
) -> torch.Tensor:
    """Exact label smoothing, `F.cross_entropy(..., label_smoothing=smoothing)`, fused, O(N) memory.

    With gradient_in_forward=True, the logits hold the gradient as soon as this returns: reading
    them after the loss (`logits.argmax(1)` for accuracy, logging) silently reads gradients, and
    nothing can detect it. Compute what you need from the logits before the loss.

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
        gradient_in_forward: the one-pass mode (docs/fused.md). The forward pass computes the
            gradient for an upstream gradient of 1 and writes it over the logits (one read of the
            logits instead of two, nothing N x C allocated); backward returns that memory, scaled by
            the upstream gradient where it is not 1 (decided on the device: no host sync). Only when
            a gradient is needed (grad mode on, logits requiring grad); otherwise the logits are only
            read. Refused: leaf logits that require grad, and with inplace_backward=True (choose
            one). Autograd raises if another op saved the logits for its backward ("modified by an
            inplace operation"), and if backward runs twice. (N, C, d1, ...) inputs and rows that are
            not contiguous are copied into rows first: the copy is overwritten, not the input.

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

        The one-pass mode, with what is needed from the logits taken before the loss:
        >>> logits = z * 1  # a layer's output
        >>> predicted = logits.argmax(1)  # before: afterwards the logits hold the gradient
        >>> loss = fused_label_smoothing(logits, torch.tensor([0]), 0.1, gradient_in_forward=True)
        >>> [round(g, 4) for g in logits[0].tolist()]
        [-0.1477, 0.142, 0.0058]
    """
    return _fused(
        input,
        target,
        smoothing,
        reduction,
        ignore_index,
        weight,
        False,
        inplace_backward,
        validate_targets,
        gradient_in_forward,
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
    gradient_in_forward: bool = False,
) -> torch.Tensor:
    """SparseLSR (equation 15, as `lsr.sparse_label_smoothing`), fused, O(N) memory, C >= 2.

    With gradient_in_forward=True, the logits hold the gradient as soon as this returns: reading
    them after the loss (`logits.argmax(1)` for accuracy, logging) silently reads gradients, and
    nothing can detect it. Compute what you need from the logits before the loss.

    Arguments as `fused_label_smoothing`, without class weights (equation 15 has none).

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> round(fused_sparse_label_smoothing(z, torch.tensor([0]), smoothing=0.1).item(), 4)
        0.3741
    """
    return _fused(
        input,
        target,
        smoothing,
        reduction,
        ignore_index,
        None,
        True,
        inplace_backward,
        validate_targets,
        gradient_in_forward,
    )


# --- modules -------------------------------------------------------------------------------------------


class FusedLSRLoss(LabelSmoothingLoss):
    """`fused_label_smoothing` as a module, a drop-in for `nn.CrossEntropyLoss(label_smoothing=)`:
    `loss_fn(input, target)` with the arguments given here.

    With gradient_in_forward=True, the logits hold the gradient as soon as this returns: reading
    them after the loss (`logits.argmax(1)` for accuracy, logging) silently reads gradients, and
    nothing can detect it. Compute what you need from the logits before the loss.

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
        gradient_in_forward: the one-pass mode: the forward pass writes the gradient over the
            logits (see `fused_label_smoothing` and docs/fused.md).

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
        gradient_in_forward: bool = False,
    ):
        super().__init__(smoothing, reduction, ignore_index)
        if inplace_backward and gradient_in_forward:  # the same refusal as the functions', at construction
            _fused_options_conflict()
        self.inplace_backward = inplace_backward
        self.validate_targets = validate_targets
        self.gradient_in_forward = gradient_in_forward
        self.register_buffer("weight", weight)
        if gradient_in_forward:
            from lsr.fused import onepass_cpu

            # Load the C++ kernel now, eagerly: a torch.compile trace cannot, and would run without it
            onepass_cpu.backend()

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
            self.gradient_in_forward,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, inplace_backward={self.inplace_backward}, "
            f"gradient_in_forward={self.gradient_in_forward}"
        )


class FusedSparseLSRLoss(FusedLSRLoss):
    """`fused_sparse_label_smoothing` as a module, a drop-in for `lsr.SparseLSRLoss`.

    With gradient_in_forward=True, the logits hold the gradient as soon as this returns: reading
    them after the loss (`logits.argmax(1)` for accuracy, logging) silently reads gradients, and
    nothing can detect it. Compute what you need from the logits before the loss.

    Args:
        smoothing: xi in [0, 1]; 0 is plain cross-entropy.
        reduction: "mean" (over non-ignored elements), "sum" or "none" (the target's shape).
        ignore_index: the target value of elements that contribute 0 and leave the mean's denominator.
        inplace_backward: write the gradient over the logits, which must not be a leaf tensor.
        validate_targets: check targets are in [0, C) (default: on CPU only); False for
            `torch.compile(fullgraph=True)`.
        gradient_in_forward: the one-pass mode: the forward pass writes the gradient over the
            logits (see `fused_label_smoothing` and docs/fused.md).

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
        gradient_in_forward: bool = False,
    ):
        super().__init__(
            smoothing, reduction, ignore_index, None, inplace_backward, validate_targets, gradient_in_forward
        )
