"""Fused O(N)-memory label smoothing losses: exact (PyTorch's `label_smoothing`) and SparseLSR.

One read of the logits forward (lse, sum of z, z_y per row), one read and one write backward; only
O(N) state is kept between them. Triton kernels on CUDA (Triton is optional and imported lazily),
compiled PyTorch on CPU. `gradient_in_forward=True` (the one-pass mode) computes the gradient in the
forward pass instead and writes it over the logits. The math is in `lsr.fused.loss`; measurements
and caveats in docs/fused.md.

Example:
    >>> import torch
    >>> from lsr.fused import fused_label_smoothing
    >>> z = torch.randn(4, 10, requires_grad=True)
    >>> fused_label_smoothing(z, torch.tensor([1, 2, 3, 4]), smoothing=0.1).backward()
"""

from lsr.fused.cpu import cpu_options, set_cpu_backend
from lsr.fused.loss import (
    FusedLabelSmoothingFunction,
    FusedLSRLoss,
    FusedOnePassFunction,
    FusedSparseLSRLoss,
    fused_label_smoothing,
    fused_sparse_label_smoothing,
    triton_available,
)

__all__ = [
    "FusedLSRLoss",
    "FusedLabelSmoothingFunction",
    "FusedOnePassFunction",
    "FusedSparseLSRLoss",
    "cpu_options",
    "fused_label_smoothing",
    "fused_sparse_label_smoothing",
    "set_cpu_backend",
    "triton_available",
]
