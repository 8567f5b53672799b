"""The LM head losses the benchmark compares: `loss(hidden, lm_weight, target, smoothing, reduction,
ignore_index)` = label-smoothed cross-entropy of `hidden @ lm_weight^T`, however each computes it.

A sibling of `lsr.registry` (the logits losses), with the same kind of entry: what it computes
(`smoothing_kind`, hence its float64 `reference`), where it runs (`devices`, `is_available`), what it
takes (`dtypes`, `max_smoothing`: `unsupported` says why not), whether its backward may run twice
(`repeatable_backward`), and `notes` where it knowingly does something a user would not guess (torch's
chunked `F.linear_cross_entropy` materialises the logits at smoothing > 0).

- `head-exact`, `head-sparse`: `lsr.linear_label_smoothing` (never holds N x V logits).
- `materialised`: `F.cross_entropy(F.linear(h, w), y, label_smoothing=)`, what a model's code does.
- `materialised-compiled`, `compiled-autochunk`: the same under `torch.compile`, without and with
  inductor's auto-chunker (`torch._inductor.config.auto_chunker.enable`).
- `torch-linear-ce`, `torch-linear-ce-chunked`: torch's `F.linear_cross_entropy`, without options
  (its reference path) and with `LinearCrossEntropyOptions()` (chunked at smoothing 0 only).
- `liger-flce`: Liger-Kernel's fused linear cross entropy (Triton: CUDA; tested under the
  interpreter on CPU).
- `cce`, `cce-torch-compile`: Cut Cross-Entropy (smoothing 0 only), its Triton kernels (CUDA) and
  its `torch.compile` path (CPU and CUDA), with `filter_eps=None` (no gradient filtering).

Example:
    >>> import torch
    >>> from lsr.heads import get
    >>> h, w = torch.randn(4, 8), torch.randn(50, 8)
    >>> y = torch.randint(0, 50, (4,))
    >>> ours, ref = get("head-exact"), get("materialised")
    >>> bool(torch.allclose(ours.loss(h, w, y, 0.1), ref.loss(h, w, y, 0.1), atol=1e-5))
    True
    >>> get("cce").unsupported(dtype="float32", smoothing=0.1)
    'cce has no label smoothing (smoothing 0 only)'
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from lsr.fused import triton_available
from lsr.fused.cpu import cxx_compiler_available
from lsr.head import linear_label_smoothing
from lsr.peers import LIGER_VERSION_TESTED, liger_installed
from lsr.reference import exact_reference, sparse_reference
from lsr.types import Device, SmoothingKind


class HeadLossFn(Protocol):
    """loss(hidden (N, H), lm_weight (V, H), target (N,), smoothing, reduction, ignore_index)."""

    def __call__(self, hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100): ...


def head_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    sparse: bool = False,
) -> torch.Tensor:
    """The float64 reference: the logits `hidden @ lm_weight^T` in float64, then `exact_reference`
    (or `sparse_reference`), differentiable. It holds N x V float64 logits: for small problems."""
    logits = hidden.double() @ lm_weight.double().t()
    reference = sparse_reference if sparse else exact_reference
    return reference(logits, target, smoothing, reduction, ignore_index)


@dataclass(frozen=True)
class HeadImplementation:
    """A named LM head loss and what the tests, the benchmark and the charts need to know of it."""

    name: str
    loss: HeadLossFn
    description: str
    smoothing_kind: SmoothingKind = "exact"
    devices: tuple[Device, ...] = ("cpu", "cuda")
    is_available: Callable[[str], bool] = field(default=lambda device: True)
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
    max_smoothing: float = 1.0  # 0: plain cross-entropy only
    # Backward may run twice through one graph (the benchmark's backward-only pass needs it)
    repeatable_backward: bool = True
    # Compiles on its first call for each shape, dtype and smoothing (seconds; first_call_s shows it)
    compiles: bool = False
    ours: bool = False
    notes: str = ""
    # Bytes a case allocates beyond its inputs, in N x V logits of the case's dtype, rounded up from
    # measured peaks: an estimate that keeps a sweep from starting a case that cannot fit
    peak_factor: float = 4.0
    chart_style: tuple[str, str] | None = None  # (colour, marker)

    @property
    def reference(self) -> Callable[..., torch.Tensor]:
        """The float64 reference of this head loss (`head_reference`), differentiable."""
        return functools.partial(head_reference, sparse=self.smoothing_kind == "sparse")

    @property
    def logits_reference(self) -> Callable[..., torch.Tensor]:
        """The float64 reference of the loss on given logits (what the gate applies a chunk at a time)."""
        return sparse_reference if self.smoothing_kind == "sparse" else exact_reference

    @property
    def can_repeat_backward(self) -> bool:
        return self.repeatable_backward

    def unsupported(self, *, dtype: str = "float32", smoothing: float = 0.0) -> str | None:
        """Why this head loss cannot take such a case (a sentence), or None when it can."""
        if dtype not in self.dtypes:
            return f"{self.name} takes {', '.join(self.dtypes)}, not {dtype}"
        if smoothing > self.max_smoothing:
            return f"{self.name} has no label smoothing (smoothing 0 only)"
        return None

    def runs_on(self, device: str | torch.device) -> bool:
        device_type = torch.device(device).type
        return device_type in self.devices and self.is_available(device_type)


# --- adapters: each takes HeadLossFn's arguments and hands the arithmetic over untouched ------------


def _ours(hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100, *, sparse=False):
    return linear_label_smoothing(
        hidden, lm_weight, target, smoothing, sparse=sparse, reduction=reduction, ignore_index=ignore_index
    )


def _materialised(hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100):
    logits = F.linear(hidden, lm_weight)
    return F.cross_entropy(
        logits, target, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing
    )


@functools.cache
def _compiled_materialised(auto_chunk: bool):
    """`_materialised` under torch.compile, made on first use. Static shapes: inductor's auto-chunker
    decides from the sizes (each grid shape compiles once). fullgraph: a graph break raises rather
    than timing eager code; the recompile limit raised for a grid's shapes, dtypes and smoothings."""
    options = {"auto_chunker.enable": auto_chunk, "cpp.dynamic_threads": True}
    return torch.compile(_materialised, dynamic=False, fullgraph=True, options=options, recompile_limit=128)


def _compiled(hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100, *, auto_chunk):
    fn = _compiled_materialised(auto_chunk)
    return fn(hidden, lm_weight, target, smoothing, reduction, ignore_index)


class TorchFellBack(UserWarning):
    """torch's F.linear_cross_entropy ignored its chunking options and materialised the logits."""


def _torch_linear_ce(
    hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100, *, chunked=False
):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.linear_cross_entropy(
            hidden,
            lm_weight,
            target,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            options=options,
        )
    for warning in caught:  # torch's "options ignored" becomes ours; any other passes on as it was
        fell_back = chunked and "``options`` ignored" in str(warning.message)
        category = TorchFellBack if fell_back else warning.category
        warnings.warn(str(warning.message).splitlines()[0], category, stacklevel=2)
    return loss


def _liger(hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_weight,
        target.reshape(-1),
        None,  # bias
        None,  # class weights
        ignore_index,
        0.0,  # lse_square_scale: no z-loss
        smoothing,
        reduction,
    )[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def _cce(hidden, lm_weight, target, smoothing=0.0, reduction="mean", ignore_index=-100, *, impl="cce"):
    if smoothing != 0:
        raise ValueError("Cut Cross-Entropy has no label smoothing")
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(
        hidden, lm_weight, target, ignore_index=ignore_index, reduction=reduction, filter_eps=None, impl=impl
    )


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def _compile_available(device: str) -> bool:
    return cxx_compiler_available() if device == "cpu" else device == "cuda" and _installed("triton")


HEAD_REGISTRY: dict[str, HeadImplementation] = {}


def register(impl: HeadImplementation) -> HeadImplementation:
    if impl.name in HEAD_REGISTRY:
        raise ValueError(f"a head loss named {impl.name!r} is already registered")
    HEAD_REGISTRY[impl.name] = impl
    return impl


def get(name: str) -> HeadImplementation:
    try:
        return HEAD_REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown head loss {name!r}; registered: {', '.join(HEAD_REGISTRY)}") from None


def available(device: str | torch.device = "cpu") -> list[HeadImplementation]:
    return [impl for impl in HEAD_REGISTRY.values() if impl.runs_on(device)]


COMPILED_NOTES = (
    "backward with retain_graph=True raises (torch.compile's donated buffers): no backward-only pass; "
    "each shape, dtype and smoothing compiles once (static shapes, as the auto-chunker needs)"
)

OURS_NOTES = (
    "computes both gradients in its forward pass when one is needed (reductions mean and sum), so its "
    "backward-only pass only hands them over (microseconds): compare forward+backward"
)

# What this project's head losses share, and what the compiled materialised losses share
OURS = {
    "is_available": lambda device: device == "cpu" or triton_available(),
    "ours": True,
    "notes": OURS_NOTES,
    "peak_factor": 0.3,
}
COMPILED = {
    "is_available": _compile_available,
    "repeatable_backward": False,
    "compiles": True,
    "peak_factor": 3.0,
}

register(
    HeadImplementation(
        name="head-exact",
        loss=_ours,
        description="lsr.linear_label_smoothing: chunks of rows, the one-pass kernel on each (C++ / Triton)",
        **OURS,
        chart_style=("#d62728", "^"),
    )
)
register(
    HeadImplementation(
        name="head-sparse",
        loss=functools.partial(_ours, sparse=True),
        smoothing_kind="sparse",
        description="lsr.linear_label_smoothing(sparse=True): SparseLSR, equation 15, chunked",
        **OURS,
        chart_style=("#9467bd", "v"),
    )
)
register(
    HeadImplementation(
        name="materialised",
        loss=_materialised,
        description="F.cross_entropy(F.linear(h, w), label_smoothing=): the N x V logits held",
        peak_factor=4.0,
        chart_style=("#1f77b4", "o"),
    )
)
register(
    HeadImplementation(
        name="materialised-compiled",
        loss=functools.partial(_compiled, auto_chunk=False),
        description="torch.compile of the materialised loss, inductor's auto-chunker off",
        **COMPILED,
        notes=COMPILED_NOTES,
        chart_style=("#e377c2", "*"),
    )
)
register(
    HeadImplementation(
        name="compiled-autochunk",
        loss=functools.partial(_compiled, auto_chunk=True),
        description="torch.compile of the materialised loss with inductor's auto-chunker on",
        **COMPILED,
        notes=COMPILED_NOTES + "; whether it chunks is inductor's choice, and the peak column tells",
        chart_style=("#7f7f7f", "p"),
    )
)
register(
    HeadImplementation(
        name="torch-linear-ce",
        loss=_torch_linear_ce,
        description="torch F.linear_cross_entropy, no options (its reference path: materialises)",
        peak_factor=4.0,
        chart_style=("#8c564b", "s"),
    )
)
register(
    HeadImplementation(
        name="torch-linear-ce-chunked",
        loss=functools.partial(_torch_linear_ce, chunked=True),
        description="torch F.linear_cross_entropy(options=LinearCrossEntropyOptions()): chunked",
        repeatable_backward=False,
        notes="at smoothing > 0 torch warns that it does not support label smoothing and falls back to "
        "its reference path, which materialises the N x V logits (the peak column shows it)",
        peak_factor=4.0,
        chart_style=("#17becf", "h"),
    )
)
register(
    HeadImplementation(
        name="liger-flce",
        loss=_liger,
        devices=("cuda",),
        description=f"Liger-Kernel's LigerFusedLinearCrossEntropyFunction(label_smoothing=), checked with {LIGER_VERSION_TESTED}",
        is_available=lambda device: device == "cuda" and liger_installed(),
        dtypes=("float32", "bfloat16", "float16"),
        repeatable_backward=False,
        notes="computes the gradients in its forward pass, in chunks of rows",
        peak_factor=1.0,
        chart_style=("#bcbd22", "X"),
    )
)
CCE_NOTES = (
    "no label smoothing: smoothing 0 only; filter_eps=None (no gradient filtering), so that it is exact"
)
register(
    HeadImplementation(
        name="cce",
        loss=_cce,
        devices=("cuda",),
        description="Cut Cross-Entropy's Triton kernels (apple/ml-cross-entropy), filter_eps=None",
        is_available=lambda device: device == "cuda" and _installed("cut_cross_entropy", "triton"),
        dtypes=("float32", "bfloat16", "float16"),
        max_smoothing=0.0,
        repeatable_backward=False,
        notes=CCE_NOTES,
        peak_factor=0.5,
        chart_style=("#2ca02c", "D"),
    )
)
register(
    HeadImplementation(
        name="cce-torch-compile",
        loss=functools.partial(_cce, impl="torch_compile"),
        description="Cut Cross-Entropy's torch.compile path (impl='torch_compile'), filter_eps=None",
        is_available=lambda device: _installed("cut_cross_entropy") and _compile_available(device),
        dtypes=("float32", "bfloat16", "float16"),
        max_smoothing=0.0,
        repeatable_backward=False,
        compiles=True,
        notes=CCE_NOTES + "; computes in float32 whatever the input dtype",
        peak_factor=4.0,
        chart_style=("#ff7f0e", "d"),
    )
)
