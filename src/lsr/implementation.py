"""`Implementation`: a named loss and every fact about it that the rest of the project reads
(`lsr.registry` lists them; `lsr.peers` defines other projects' ones)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lsr.reference import exact_reference, sparse_reference
from lsr.types import DTYPES, REDUCTIONS, Device, LossFn, Reduction, SmoothingKind


@dataclass(frozen=True)
class Implementation:
    """A named loss implementation and every fact about it that the tests, the benchmark and the
    charts need, so that none of them branches on its name.

    What it computes (`smoothing_kind`: exact label smoothing or SparseLSR, hence its float64
    `reference`); where it runs (`devices`, `is_available`); what it takes (`dtypes`, `reductions`,
    `supports_weight`, `supports_ignore_index`, `min_classes`: `unsupported` says why not); how it
    treats its logits (`writes_logits`: never, in its backward, or already in its forward); what the
    benchmark must know to run it safely (`can_repeat_backward`, `peak_factor`); its known numerical
    limits (`accurate_near_certainty`, `overflows_at_extremes`, `double_backward`); where it comes
    from (`fused`: this project's O(N)-memory kernels; `peer`: another project's loss); how the
    charts draw it (`chart_style`); and `notes`, where its arithmetic knowingly differs from
    PyTorch's in a case it does take.

    Example:
        >>> from lsr.registry import get
        >>> impl = get("fused-exact-onepass")
        >>> impl.writes_logits, impl.overwrites_logits, impl.can_repeat_backward
        ('in forward', True, False)
    """

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
    # Bytes a benchmark case allocates beyond its inputs, in logits (from measured forward+backward
    # peaks, the gate included, rounded up): an estimate that keeps a sweep from starting a case that
    # cannot fit, never a measurement. The default assumes the dense baseline's appetite.
    peak_factor: float = 4.0
    fused: bool = False  # one of this project's O(N)-memory kernels (lsr.fused)
    peer: bool = False  # another project's loss (lsr.peers), with tests of its own (tests/test_peers.py)
    # Differentiable twice (a gradient penalty): the fused losses' closed-form gradient is not a graph
    double_backward: bool = True
    # Accurate to its dtype's rounding however close p_y is to 1 (eager equation 15 is not: its
    # log(1 - p_y + 1e-7) loses digits in float32 as p_y -> 1)
    accurate_near_certainty: bool = True
    # Logits dtypes in which logits near +-1e4 overflow to inf (PyTorch's own float16 arithmetic)
    overflows_at_extremes: tuple[str, ...] = ()
    chart_style: tuple[str, str] | None = None  # (colour, marker) in every chart; None: from its name

    @property
    def writes_logits(self) -> Literal["never", "in backward", "in forward"]:
        """When it overwrites its logits with their gradient: never, in its backward pass
        (`inplace_backward`), or already in its forward pass (`gradient_in_forward`)."""
        if self.gradient_in_forward:
            return "in forward"
        return "in backward" if self.inplace_backward else "never"

    @property
    def overwrites_logits(self) -> bool:
        """Whether it writes the gradient over its logits at all: its floor is `floor`, not
        `floor-alloc`, and the benchmark gives it a copy of the logits to overwrite."""
        return self.writes_logits != "never"

    @property
    def can_repeat_backward(self) -> bool:
        """Whether backward may run twice through one graph (the benchmark's backward-only pass)."""
        return self.repeatable_backward and not self.overwrites_logits

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
            >>> from lsr.registry import get
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
