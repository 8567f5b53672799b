"""The fused losses' public API: `fused_label_smoothing`, `fused_sparse_label_smoothing` and their
modules, `FusedLSRLoss` and `FusedSparseLSRLoss`. They check and lay out the arguments, then run one
of the autograd Functions in `autograd.py`; the math is in `algebra.py`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from lsr._common import (
    LabelSmoothingLoss,
    as_rows,
    check_reduction,
    check_smoothing,
    check_weight,
    compute_dtype,
    row_layout,
)
from lsr.fused import cpu, passes
from lsr.fused.autograd import (
    NO_FORWARD_AD,
    CppLabelSmoothingFunction,
    CppOnePassFunction,
    FusedLabelSmoothingFunction,
    FusedOnePassFunction,
)

# --- functional API ------------------------------------------------------------------------------------


def _fused_options_conflict():
    raise ValueError(
        "gradient_in_forward=True and inplace_backward=True: choose one. gradient_in_forward already "
        "writes the gradient over the logits (in the forward pass); inplace_backward does it in the "
        "backward pass of the two-pass mode"
    )


def _fused(
    input,
    target,
    smoothing,
    reduction,
    ignore_index,
    weight,
    sparse,
    inplace_backward,
    validate,
    gradient_in_forward,
):
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    if gradient_in_forward and inplace_backward:
        _fused_options_conflict()
    min_classes = 2 if sparse else 1
    # On the C++ kernels the targets are checked in C++ as they are read: no torch ops here, each of
    # which costs tens of microseconds after a sweep that emptied the caches (docs/fused.md)
    in_cpp = isinstance(input, torch.Tensor) and passes.whole_in_cpp(input)
    if in_cpp:
        logits, target, out_shape = row_layout(
            input, target, ignore_index, min_classes=min_classes, validate_targets=False
        )
        validate = validate is None or validate  # None: check on CPU, where the C++ kernels run
    else:
        rows = as_rows(input, target, ignore_index, min_classes=min_classes, validate_targets=validate)
        logits, out_shape = rows.logits, rows.out_shape
    check_weight(weight, logits.shape[1], logits.device)
    # Checked here, not by a jvp method, which Dynamo cannot trace; torch.func would fail later anyway,
    # with a message about setup_context
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or forward_ad.unpack_dual(input).tangent is not None
    ):
        raise NotImplementedError(NO_FORWARD_AD)
    needs_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and input.is_leaf and needs_grad:
        raise ValueError(
            "inplace_backward=True would overwrite a leaf tensor with its own gradient (a parameter used "
            "as logits would become its .grad); pass logits computed from it (a layer's output), or "
            "inplace_backward=False"
        )
    if gradient_in_forward and input.is_leaf and needs_grad:
        raise ValueError(
            "gradient_in_forward=True would overwrite a leaf tensor with its own gradient during the "
            "forward pass (a parameter used as logits would become its .grad); pass logits computed from "
            "it (a layer's output), or gradient_in_forward=False"
        )
    if weight is not None:
        if weight.requires_grad:
            raise ValueError("weight must not require grad: the fused losses give no gradient for it")
        weight = weight.to(compute_dtype(logits.dtype)).contiguous()
    logits = logits.contiguous()  # a view for (N, C) input; (N, C, d1, ...) is already a copy
    # Without a backward to come, the two-pass Function runs: the logits are only read, as by default
    one_pass = gradient_in_forward and needs_grad
    if in_cpp:
        args = (logits, target, weight, smoothing, sparse, reduction, ignore_index, validate, out_shape)
        if one_pass:
            return CppOnePassFunction.apply(*args)
        return CppLabelSmoothingFunction.apply(*args, bool(inplace_backward))
    args = (logits, rows.safe_target, rows.valid, weight, smoothing, sparse, reduction, out_shape)
    if one_pass:
        return FusedOnePassFunction.apply(*args)
    return FusedLabelSmoothingFunction.apply(*args, bool(inplace_backward))


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
            Unchecked, a target outside [0, C) is never read: it raises on the plain-PyTorch CPU
            paths run eagerly, and makes its row's loss and gradient NaN on the C++ and Triton
            kernels and inside `torch.compile`.
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
        super().__init__(smoothing, reduction, ignore_index, weight)
        if inplace_backward and gradient_in_forward:  # the same refusal as the functions', at construction
            _fused_options_conflict()
        self.inplace_backward = inplace_backward
        self.validate_targets = validate_targets
        self.gradient_in_forward = gradient_in_forward
        # Load the C++ kernels now, eagerly: a torch.compile trace cannot, and would run without them
        cpu.cpu_backend(0)

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
