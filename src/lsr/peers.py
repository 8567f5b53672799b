"""Other projects' label smoothing losses, as registered implementations: thin adapters, honest flags.

Each adapter takes the registry's loss signature (`lsr.types.LossFn`), runs lsr's own argument
checks, and hands the arithmetic to the peer untouched. What a peer cannot take is said by its
`Implementation` flags, so that the benchmark records such a case `unsupported`, never `failed`;
where its arithmetic knowingly differs from PyTorch's in a case it does take, `notes` says so.

- `native-compiled`: `torch.compile` of `F.cross_entropy(label_smoothing=)` (CPU needs a C++
  compiler, CUDA needs Triton).
- `liger`: Liger-Kernel's Triton cross-entropy (`pip install lsr-bench[peers]`), CUDA only. Its
  forward pass overwrites the logits with their gradient.

Peers that are not installed are still registered, with `is_available` false, so that the
benchmark reports them as not available rather than leaving them out. docs/peers.md has what each
peer is, the versions checked, the differences found, and the peers that cannot be benchmarked.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

from lsr._common import check_input, check_reduction, check_smoothing, check_weight
from lsr.fused.cpu import cxx_compiler_available
from lsr.implementation import Implementation

# --- native-compiled: torch.compile of F.cross_entropy ---------------------------------------------


def _cross_entropy(input, target, weight, ignore_index, reduction, smoothing):
    return F.cross_entropy(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=smoothing,
    )


# Enough compilations for every dtype x reduction x weighting x layout x smoothing x device a sweep
# meets (one each). At the default limit of 8 per function dynamo would run the function eagerly,
# with only a warning, and the benchmark would time eager code under this name.
RECOMPILE_LIMIT = 128


@functools.cache
def _compiled_cross_entropy():
    """The one compiled function, made on first use (importing lsr compiles nothing).

    dynamic=True: sizes are symbolic from the first compilation, so a sweep over batch sizes and
    class counts compiles once per dtype, reduction, weighting, layout and device, not once per
    shape (sizes 0 and 1 are still specialised: a batch of one row compiles once more; with class
    weights the class count is specialised too, by F.cross_entropy's C++ label smoothing). The
    default (None) would specialise the first shape, recompile on the second, and so time the
    first size with a kernel specialised to it and the others with a dynamic one. ignore_index is
    not specialised; the smoothing is, as F.cross_entropy's C++ signature takes a double: each
    smoothing value compiles once. cpp.dynamic_threads: as lsr.fused.cpu, always emit an OpenMP
    region on CPU; otherwise the first, possibly tiny, input fixes serial loops for every later
    shape. fullgraph=True: a graph break or a hit recompile limit raises, rather than timing eager
    code. Otherwise torch.compile's defaults, donated buffers included: the compiled backward may
    reuse what the forward saved, so backward with retain_graph=True raises (docs/peers.md).
    """
    kwargs = {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.13
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    return torch.compile(
        _cross_entropy, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True}, **kwargs
    )


def native_compiled_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    weight: torch.Tensor | None = None,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """`lsr.native_label_smoothing`, with the `F.cross_entropy` call compiled by `torch.compile`.

    The checks run eagerly, outside the compiled region, which is the one F.cross_entropy call.
    The first call with a new dtype, reduction, weighting, layout, device or smoothing value (and,
    with class weights, class count) compiles: seconds.
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    batched, _, _ = check_input(input, target, ignore_index, validate_targets=validate_targets)
    check_weight(weight, batched.shape[1], input.device)
    if weight is not None:
        weight = weight.to(input.dtype)
    return _compiled_cross_entropy()(input, target.long(), weight, ignore_index, reduction, smoothing)


def native_compiled_is_available(device: str) -> bool:
    """Inductor's backends: C++ (a compiler on PATH) on CPU, Triton on CUDA."""
    if device == "cpu":
        return cxx_compiler_available()
    if device == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


# --- liger: Liger-Kernel's Triton cross-entropy ------------------------------------------------------

LIGER_VERSION_TESTED = "0.8.5"


def liger_installed() -> bool:
    """Whether liger_kernel and Triton (which it imports) are installed, checked without importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("liger_kernel", "triton"))


def liger_is_available(device: str) -> bool:
    return device == "cuda" and liger_installed()


def liger_label_smoothing(
    input: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    weight: torch.Tensor | None = None,
    validate_targets: bool | None = None,
) -> torch.Tensor:
    """Liger-Kernel's `LigerCrossEntropyFunction` with `label_smoothing`, behind lsr's checks.

    Its forward pass writes the gradient over the (M, C) logits it is given, and zeroes the rows of
    ignored targets even without autograd. (N, C) and (C,) logits are overwritten in the caller's
    storage; (N, C, d1, ...) logits are first copied to rows, class dimension last, so those are not.
    Computes in float32 whatever the input dtype; the loss has the input's dtype. An empty batch
    raises (Liger cannot take one).
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    batched, batched_target, out_shape = check_input(
        input, target, ignore_index, validate_targets=validate_targets
    )
    num_classes = batched.shape[1]
    check_weight(weight, num_classes, input.device)
    if batched_target.numel() == 0:
        raise ValueError("liger cannot take an empty batch (liger-kernel reduces over the targets)")
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction  # imports Triton: only here

    # (N, C) stays a view (Liger overwrites it); (N, C, d1, ...) is copied into rows, as as_rows does.
    rows = batched.movedim(1, -1).reshape(-1, num_classes) if batched.dim() > 2 else batched
    if weight is not None:
        weight = weight.to(torch.float32)  # Liger's compute dtype (it reads the weights as they come)
    loss = LigerCrossEntropyFunction.apply(
        rows,
        batched_target.reshape(-1).long(),
        weight,
        ignore_index,
        0.0,  # lse_square_scale: no z-loss
        smoothing,
        reduction,
        None,  # softcap: none
        False,  # return_z_loss
        False,  # return_token_accuracy
        False,  # return_predicted_tokens
    )[0]
    return loss.reshape(out_shape) if reduction == "none" else loss


NATIVE_COMPILED_NOTES = (
    "its first call for each dtype, reduction, weighting, layout and smoothing value (and, with "
    "class weights, class count) compiles (seconds); backward with retain_graph=True or create_graph=True raises (torch.compile's "
    "donated buffers), so it has no backward-only pass, gradcheck or double backward; on CPU at "
    "50,000 classes its float32 gradient is off by up to 8e-4 relative in the largest non-target "
    "entries (eager F.cross_entropy: 7e-5)"
)

LIGER_NOTES = (
    "its forward pass overwrites the logits with their gradient (and zeroes ignored rows even "
    "without autograd); computes in float32, so float64 is not offered; a mean over no valid "
    "target is 0, and over targets of weight 0 inf, where PyTorch gives NaN; an empty batch "
    "raises; it reads values back to the host 3 times a forward (6 with weights) and once a "
    "backward, synchronising the device (included in its times); each smoothing value and "
    "reduction compiles its kernel once"
)


def implementations() -> list[Implementation]:
    """The peers' registry entries (lsr.registry registers them; installed or not)."""
    return [
        Implementation(
            name="native-compiled",
            loss=native_compiled_label_smoothing,
            smoothing_kind="exact",
            devices=("cpu", "cuda"),
            supports_weight=True,
            min_classes=1,
            description="torch.compile(F.cross_entropy(label_smoothing=)), dynamic shapes",
            is_available=native_compiled_is_available,
            notes=NATIVE_COMPILED_NOTES,
            repeatable_backward=False,
            peer=True,
            peak_factor=1.1,  # measured on CPU: forward+backward peaks at the gradient alone
            chart_style=("#e377c2", "*"),
        ),
        Implementation(
            name="liger",
            loss=liger_label_smoothing,
            smoothing_kind="exact",
            devices=("cuda",),
            supports_weight=True,
            min_classes=1,
            description=f"Liger-Kernel's Triton LigerCrossEntropyFunction(label_smoothing=), checked with {LIGER_VERSION_TESTED}",
            is_available=liger_is_available,
            inplace_backward=True,
            dtypes=("float32", "float16", "bfloat16"),
            notes=LIGER_NOTES,
            peer=True,
            peak_factor=2.1,  # writes its gradient into a copy of the logits, as fused-exact-inplace
            chart_style=("#bcbd22", "X"),
        ),
    ]
