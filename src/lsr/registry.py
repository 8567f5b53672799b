"""The named loss implementations: the one list that tests, benchmarks and the CLI read, and the one
place that names them. Each entry (`lsr.implementation.Implementation`) carries every fact about
it; the names the reports compare against are below (`BASELINES`, `PAPER_PAIR`).
"""

from __future__ import annotations

import functools

import torch

from lsr import peers
from lsr.dense import dense_label_smoothing
from lsr.fused import fused_label_smoothing, fused_sparse_label_smoothing, triton_available
from lsr.implementation import Implementation
from lsr.native import native_label_smoothing
from lsr.sparse import sparse_label_smoothing
from lsr.types import DEVICES, SMOOTHING_KINDS

# What a user would otherwise call: the numerators of the reports' speedups, eager PyTorch first
EAGER_BASELINE = "native"
BASELINES = (EAGER_BASELINE, "native-compiled")
# The SparseLSR paper's comparison: its loss against its dense baseline
PAPER_PAIR = ("sparse", "dense")


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
        peak_factor=3.0,
        overflows_at_extremes=("float16",),
        chart_style=("#1f77b4", "o"),
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
        peak_factor=4.0,
        chart_style=("#ff7f0e", "s"),
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
        peak_factor=3.0,
        accurate_near_certainty=False,
        chart_style=("#2ca02c", "D"),
    )
)

# --- fused losses (lsr.fused): Triton on CUDA, compiled PyTorch on CPU ---------------------------------


def _fused_is_available(device: str) -> bool:
    return device == "cpu" or triton_available()


# What every fused loss is: this project's kernel, whose closed-form gradient has no graph
FUSED = {"fused": True, "double_backward": False}


register(
    Implementation(
        name="fused-exact",
        loss=fused_label_smoothing,
        smoothing_kind="exact",
        devices=("cpu", "cuda"),
        supports_weight=True,
        min_classes=1,
        description="closed form in O(N) memory: one pass forward, one backward (Triton / C++ on CPU)",
        is_available=_fused_is_available,
        **FUSED,
        peak_factor=1.1,
        chart_style=("#d62728", "^"),
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
        **FUSED,
        peak_factor=1.1,
        chart_style=("#9467bd", "v"),
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
        **FUSED,
        peak_factor=2.1,  # the benchmark gives it a copy of the logits to overwrite
        chart_style=("#8c564b", "P"),
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
        **FUSED,
        peak_factor=2.1,  # each call gets fresh logits to overwrite, and the gate one more copy
        chart_style=("#17becf", "h"),
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
        **FUSED,
        peak_factor=2.1,
        chart_style=("#393b79", "H"),  # tab20b navy: apart from the exact variant's cyan
    )
)

# --- peers (lsr.peers): other projects' losses, registered whether installed or not -----------------

for _peer in peers.implementations():
    register(_peer)
