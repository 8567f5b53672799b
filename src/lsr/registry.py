"""The named loss implementations: the one list that tests, benchmarks and the CLI read.

Each entry says what it computes (exact label smoothing or SparseLSR), which float64 reference it
must agree with, which devices it runs on and whether it takes class weights. Implementations that
need optional packages (Triton) say so through `is_available`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lsr.dense import dense_label_smoothing
from lsr.fused import fused_label_smoothing, fused_sparse_label_smoothing, triton_available
from lsr.native import native_label_smoothing
from lsr.reference import exact_reference, sparse_reference
from lsr.sparse import sparse_label_smoothing
from lsr.types import DEVICES, DTYPES, REDUCTIONS, SMOOTHING_KINDS, Device, LossFn, Reduction, SmoothingKind


@dataclass(frozen=True)
class Implementation:
    name: str
    loss: LossFn  # loss(input, target, smoothing, reduction, ignore_index[, weight=])
    smoothing_kind: SmoothingKind  # the function it computes
    devices: tuple[Device, ...]  # device types it runs on
    supports_weight: bool
    min_classes: int
    description: str
    is_available: Callable[[str], bool] = field(default=lambda device: True)
    # Writes the gradient into the logits' storage: benchmarks give it its own copy of the logits
    # and skip the backward-only pass (running backward twice on one graph is what it forbids).
    inplace_backward: bool = False
    # Computes the gradient in its forward pass and writes it over the logits there (the one-pass
    # mode): benchmarks give every call its own logits, take the reference from a copy made before
    # the call, and skip the backward-only pass.
    gradient_in_forward: bool = False
    # Can run backward more than once through one graph (retain_graph=True): the benchmark's
    # backward-only pass needs it. In-place losses cannot; neither can a torch.compile'd graph,
    # whose donated buffers are freed by the first backward.
    repeatable_backward: bool = True
    dtypes: tuple[str, ...] = tuple(DTYPES)  # logits dtypes it takes
    reductions: tuple[Reduction, ...] = REDUCTIONS
    supports_ignore_index: bool = True
    # Where its arithmetic knowingly differs from PyTorch's in a case it does take (said, not hidden
    # by a wider tolerance); shown by the README and the CLI.
    notes: str = ""

    @property
    def can_repeat_backward(self) -> bool:
        """Whether backward may run twice through one graph (the benchmark's backward-only pass)."""
        return self.repeatable_backward and not (self.inplace_backward or self.gradient_in_forward)

    @property
    def reference(self) -> LossFn:
        return exact_reference if self.smoothing_kind == "exact" else sparse_reference

    def unsupported(
        self,
        *,
        classes: int,
        dtype: str = "float32",
        reduction: str = "mean",
        weighted: bool = False,
        ignoring: bool = False,
    ) -> str | None:
        """Why this implementation cannot take such a case (a sentence), or None when it can.

        Example:
            >>> get("sparse").unsupported(classes=1)
            'sparse needs at least 2 classes'
            >>> get("native").unsupported(classes=10, weighted=True) is None
            True
        """
        if classes < self.min_classes:
            return f"{self.name} needs at least {self.min_classes} classes"
        if dtype not in self.dtypes:
            return f"{self.name} takes {', '.join(self.dtypes)} logits, not {dtype}"
        if reduction not in self.reductions:
            return f"{self.name} has no reduction {reduction!r}"
        if weighted and not self.supports_weight:
            return f"{self.name} takes no class weights"
        if ignoring and not self.supports_ignore_index:
            return f"{self.name} has no ignore_index"
        return None

    def runs_on(self, device: str | torch.device) -> bool:
        device_type = torch.device(device).type
        return device_type in self.devices and self.is_available(device_type)


REGISTRY: dict[str, Implementation] = {}


def register(impl: Implementation) -> Implementation:
    if impl.smoothing_kind not in SMOOTHING_KINDS:
        raise ValueError(f"smoothing_kind must be one of {SMOOTHING_KINDS}, got {impl.smoothing_kind!r}")
    if impl.name in REGISTRY:
        raise ValueError(f"an implementation named {impl.name!r} is already registered")
    REGISTRY[impl.name] = impl
    return impl


def get(name: str) -> Implementation:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown implementation {name!r}; registered: {', '.join(REGISTRY)}") from None


def available(device: str | torch.device = "cpu") -> list[Implementation]:
    """The registered implementations that run on `device` here."""
    return [impl for impl in REGISTRY.values() if impl.runs_on(device)]


register(
    Implementation(
        name="native",
        loss=native_label_smoothing,
        smoothing_kind="exact",
        devices=DEVICES,
        supports_weight=True,
        min_classes=1,
        description="PyTorch F.cross_entropy(label_smoothing=)",
    )
)
register(
    Implementation(
        name="dense",
        loss=dense_label_smoothing,
        smoothing_kind="exact",
        devices=DEVICES,
        supports_weight=True,
        min_classes=1,
        description="N x C smoothed targets times log_softmax (the paper's baseline)",
    )
)
register(
    Implementation(
        name="sparse",
        loss=sparse_label_smoothing,
        smoothing_kind="sparse",
        devices=DEVICES,
        supports_weight=False,
        min_classes=2,
        description="SparseLSR, equation 15, eager PyTorch",
    )
)

# --- fused losses (lsr.fused): Triton on CUDA, compiled PyTorch on CPU ---------------------------------


def _fused_is_available(device: str) -> bool:
    return device == "cpu" or triton_available()


register(
    Implementation(
        name="fused-exact",
        loss=fused_label_smoothing,
        smoothing_kind="exact",
        devices=("cpu", "cuda"),
        supports_weight=True,
        min_classes=1,
        description="closed form in O(N) memory: one pass forward, one backward (Triton / compiled CPU)",
        is_available=_fused_is_available,
    )
)
register(
    Implementation(
        name="fused-sparse",
        loss=fused_sparse_label_smoothing,
        smoothing_kind="sparse",
        devices=("cpu", "cuda"),
        supports_weight=False,
        min_classes=2,
        description="SparseLSR (equation 15) in O(N) memory: one pass forward, one backward",
        is_available=_fused_is_available,
    )
)
register(
    Implementation(
        name="fused-exact-inplace",
        loss=functools.partial(fused_label_smoothing, inplace_backward=True),
        smoothing_kind="exact",
        devices=("cpu", "cuda"),
        supports_weight=True,
        min_classes=1,
        description="fused-exact with inplace_backward=True: the gradient overwrites the logits",
        is_available=_fused_is_available,
        inplace_backward=True,
    )
)

register(
    Implementation(
        name="fused-exact-onepass",
        loss=functools.partial(fused_label_smoothing, gradient_in_forward=True),
        smoothing_kind="exact",
        devices=("cpu", "cuda"),
        supports_weight=True,
        min_classes=1,
        description="fused-exact with gradient_in_forward=True: one pass, the forward writes the gradient "
        "over the logits (C++ / Triton)",
        is_available=_fused_is_available,
        gradient_in_forward=True,
    )
)
register(
    Implementation(
        name="fused-sparse-onepass",
        loss=functools.partial(fused_sparse_label_smoothing, gradient_in_forward=True),
        smoothing_kind="sparse",
        devices=("cpu", "cuda"),
        supports_weight=False,
        min_classes=2,
        description="fused-sparse with gradient_in_forward=True: one pass, the forward writes the gradient "
        "over the logits (C++ / Triton)",
        is_available=_fused_is_available,
        gradient_in_forward=True,
    )
)

# --- peers (lsr.peers): other projects' losses, registered whether installed or not -----------------

from lsr import peers  # noqa: E402 - needs Implementation above

for _peer in peers.implementations():
    register(_peer)
