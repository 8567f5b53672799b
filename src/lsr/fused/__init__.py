"""Fused O(N)-memory label smoothing losses: exact (PyTorch's `label_smoothing`) and SparseLSR.

One read of the logits forward (lse, sum of z, z_y per row), one read and one write backward; only
O(N) state is kept between them. Triton kernels on CUDA (Triton is optional and imported lazily),
C++ kernels on CPU (compiled or chunked PyTorch where no compiler is at hand). `gradient_in_forward=True` (the one-pass mode) computes the gradient in the
forward pass instead and writes it over the logits. The math is in `lsr.fused.algebra`; measurements
and caveats in docs/fused.md.

The modules, from the public API down:
    loss         the functions and modules (`fused_label_smoothing`, `FusedLSRLoss`, ...)
    autograd     the autograd Functions: two-pass, and one-pass (gradient_in_forward=True)
    algebra      the math, and the per-row algebra, O(N)
    passes       the passes over the logits, on the backend that runs them
    triton_kernels, cpu, cpp   the backends: Triton; CPU (cpu.py decides); the C++ kernels on CPU

Example:
    >>> import torch
    >>> from lsr.fused import fused_label_smoothing
    >>> z = torch.randn(4, 10, requires_grad=True)
    >>> fused_label_smoothing(z, torch.tensor([1, 2, 3, 4]), smoothing=0.1).backward()
"""

from lsr.fused.autograd import FusedLabelSmoothingFunction, FusedOnePassFunction
from lsr.fused.cpu import cpu_options, set_cpu_backend
from lsr.fused.loss import (
    FusedLSRLoss,
    FusedSparseLSRLoss,
    fused_label_smoothing,
    fused_sparse_label_smoothing,
)
from lsr.fused.passes import triton_available

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
