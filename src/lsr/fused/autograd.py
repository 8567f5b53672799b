"""The autograd Functions of the fused losses: the two-pass one (statistics forward, gradient
backward) and the one-pass one (gradient_in_forward=True: the gradient written in the forward pass),
each as passes with the per-row algebra in PyTorch between them, and on CPU where the C++ kernels
run, as one C++ call per forward and per backward (`Cpp*`; `passes.whole_in_cpp` decides).

All take (M, C) contiguous logits and targets laid out as rows (`lsr._common.as_rows`; the `Cpp*`
ones `row_layout`'s targets as given); the math is in `algebra.py` (and, for the C++ calls, in
csrc/fused.cpp's `row_coefficients`), the passes over the logits in `passes.py`.
"""

from __future__ import annotations

import torch

from lsr._common import compute_dtype
from lsr.fused import cpp, passes
from lsr.fused.algebra import in_range, mean_denominator, reduce_from_stats, reduce_rows, row_upstream

_ALTERNATIVE = "use lsr.native_label_smoothing (F.cross_entropy) or lsr.dense_label_smoothing there"
NO_DOUBLE_BACKWARD = (
    "the fused losses have no double backward: their gradient is computed in closed form, not recorded "
    f"as a graph, so it cannot be differentiated (create_graph=True, e.g. a gradient penalty); {_ALTERNATIVE}"
)
NO_FORWARD_AD = (
    "the fused losses have no forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and support "
    f"no torch.func transform (grad, vmap, ...); {_ALTERNATIVE}"
)
_ONE_BACKWARD = (
    "backward ran a second time through a loss computed with gradient_in_forward=True: its gradient "
    "lives in the logits' memory and the first backward handed it on (retain_graph=True cannot repeat "
    "it); compute the loss again, or use gradient_in_forward=False"
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
        lse, z_y, dot, one_minus_p_y = passes.row_stats(logits, target, weight, acc_dtype, sparse)
        third = one_minus_p_y if sparse else dot
        loss, alpha, gamma, tau, denominator, _ = reduce_from_stats(
            lse, z_y, third, target, valid, weight, smoothing, num_classes, sparse, reduction, out_shape
        )
        per_row_alpha = alpha if torch.is_tensor(alpha) else None
        ctx.save_for_backward(logits, target, valid, weight, lse, tau, denominator, per_row_alpha)
        ctx.alpha = None if torch.is_tensor(alpha) else alpha
        ctx.gamma, ctx.reduction, ctx.inplace = gamma, reduction, inplace
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the caller would differentiate the gradient
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        logits, target, valid, weight, lse, tau, denominator, alpha = ctx.saved_tensors
        alpha = ctx.alpha if alpha is None else alpha
        target_ok, index = in_range(target, logits.shape[1])
        s = row_upstream(grad_output.to(lse.dtype), ctx.reduction, denominator, valid, target_ok)
        grad = passes.gradient(logits, index, weight, lse, s * alpha, s * ctx.gamma, s * tau, ctx.inplace)
        return grad, None, None, None, None, None, None, None, None


class FusedOnePassFunction(torch.autograd.Function):
    """(M, C) contiguous logits -> the reduced loss; the forward pass overwrites the logits with the
    gradient for an upstream gradient of 1, the backward pass returns that memory, scaled only where
    the upstream gradient is not 1. Nothing else is saved.

    Non-tensor arguments: smoothing, sparse, reduction and out_shape, as FusedLabelSmoothingFunction.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, weight, smoothing, sparse, reduction, out_shape):
        acc_dtype = compute_dtype(logits.dtype)
        target_ok, index = in_range(target, logits.shape[1])
        w_y = None if weight is None else weight[index]
        denominator = mean_denominator(valid, w_y, acc_dtype) if reduction == "mean" else None
        # Each row's share of a backward of 1: 1/denominator (mean) or 1; 0 ignored, NaN bad target
        one = valid.new_ones((), dtype=acc_dtype)
        scale = row_upstream(one, reduction, denominator, valid, target_ok)
        row_loss = passes.forward_gradient(logits, index, weight, scale, smoothing, sparse)
        loss = reduce_rows(row_loss, valid, target_ok, reduction, out_shape, denominator)
        ctx.save_for_backward(logits)  # the gradient now; autograd checks nothing wrote it since
        ctx.reduction, ctx.used = reduction, False
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return _onepass_gradient(ctx, grad_output), None, None, None, None, None, None, None


def _onepass_gradient(ctx, grad_output):
    """The one-pass backward: the gradient the forward pass left in the logits, scaled where the
    upstream gradient is not 1."""
    if torch.is_grad_enabled():  # create_graph=True: the caller would differentiate the gradient
        raise RuntimeError(NO_DOUBLE_BACKWARD)
    if ctx.used:  # the first backward scaled and handed on the gradient
        raise RuntimeError(_ONE_BACKWARD)
    ctx.used = True
    (grad,) = ctx.saved_tensors
    upstream = grad_output.reshape(-1) if ctx.reduction == "none" else grad_output
    return passes.scale_by_upstream(grad, upstream)


class CppLabelSmoothingFunction(torch.autograd.Function):
    """FusedLabelSmoothingFunction in one C++ call each way (`cpp.loss_forward`, `cpp.loss_backward`):
    the same results, from targets as given (ignore_index and the range check done in C++);
    saves lse, alpha, tau and each row's share per row.

    Non-tensor arguments: smoothing, sparse, reduction, ignore_index, validate (raise for a target
    outside [0, C), else its row is NaN), out_shape and inplace.
    """

    @staticmethod
    def forward(
        ctx, logits, target, weight, smoothing, sparse, reduction, ignore_index, validate, out_shape, inplace
    ):
        loss, lse, alpha, tau, share = cpp.loss_forward(
            logits, target, weight, smoothing, sparse, reduction, ignore_index, validate
        )
        ctx.save_for_backward(logits, target, weight, lse, alpha, tau, share)
        ctx.gamma = 0.0 if sparse else smoothing / logits.shape[1]
        ctx.inplace = inplace
        return loss.reshape(out_shape) if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the caller would differentiate the gradient
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        logits, target, weight, lse, alpha, tau, share = ctx.saved_tensors
        out = logits if ctx.inplace else torch.empty_like(logits)
        cpp.loss_backward(logits, target, weight, lse, alpha, tau, share, ctx.gamma, grad_output, out)
        return (out,) + (None,) * 9


class CppOnePassFunction(torch.autograd.Function):
    """FusedOnePassFunction in one C++ call (`cpp.onepass_loss`): the same contract, targets as
    CppLabelSmoothingFunction takes them.

    Non-tensor arguments: smoothing, sparse, reduction, ignore_index, validate and out_shape.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, smoothing, sparse, reduction, ignore_index, validate, out_shape):
        loss = cpp.onepass_loss(logits, target, weight, smoothing, sparse, reduction, ignore_index, validate)
        ctx.save_for_backward(logits)  # the gradient now; autograd checks nothing wrote it since
        ctx.reduction, ctx.used = reduction, False
        return loss.reshape(out_shape) if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_output):
        return (_onepass_gradient(ctx, grad_output),) + (None,) * 8
