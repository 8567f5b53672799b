"""The words every part of lsr shares: devices, dtypes, reductions, smoothing kinds, the loss signature.

Defined once here; the losses, the registry and the benchmark import them (the benchmark's own words,
passes and statuses, live in `lsr.bench.data`, the schema of what it records).
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

import torch

Device = Literal["cpu", "cuda", "mps"]
Reduction = Literal["mean", "sum", "none"]
# What a loss computes: PyTorch's exact label smoothing, or SparseLSR's equation 15.
SmoothingKind = Literal["exact", "sparse"]

DEVICES: tuple[Device, ...] = get_args(Device)
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
SMOOTHING_KINDS: tuple[SmoothingKind, ...] = get_args(SmoothingKind)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
HALF_DTYPES = (torch.float16, torch.bfloat16)


class LossFn(Protocol):
    """The signature every registered loss shares (`F.cross_entropy`'s order and conventions)."""

    def __call__(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        smoothing: float = 0.0,
        reduction: Reduction = "mean",
        ignore_index: int = -100,
        **options,
    ) -> torch.Tensor: ...
