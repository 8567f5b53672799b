"""The passes over the logits, each on the backend that runs it: Triton kernels on CUDA
(`triton_kernels.py`; Triton is optional and imported only when a kernel is first needed), and on
CPU the C++ kernels (`cpp.py`) or, without a compiler, compiled or chunked PyTorch (`cpu.py` decides).
What each pass computes is in `algebra.py`.

- `row_stats`: one read of the logits -> lse, z_y, and dot (exact) or 1 - p_y (sparse) per row;
- `gradient`: one read, one write -> p exp(z_k - lse) - r w_k, and t on the target column;
- `forward_gradient`: the one-pass contract -> row losses, the gradient written over the logits;
- `scale_by_upstream`: the one-pass backward's scaling, skipped where the upstream gradient is 1.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from lsr.fused import cpu


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _uses_triton(logits: torch.Tensor) -> bool:
    if logits.is_cuda:
        return triton_available()
    return logits.device.type == "cpu" and cpu.cpu_backend(logits.numel()) == "triton"


def whole_in_cpp(logits: torch.Tensor) -> bool:
    """Whether a forward or backward over these logits is one call of the C++ kernels (CPU, where
    they run), the per-row algebra included."""
    return logits.device.type == "cpu" and cpu.cpu_backend(logits.numel()) == "cpp"


def _kernels():
    from lsr.fused import triton_kernels  # imports Triton: only here, when a kernel is needed

    return triton_kernels


def row_stats(logits, target, weight, acc_dtype, sparse) -> cpu.RowStats:
    """lse, z_y, dot (exact) and 1 - p_y (sparse) per row; the one not needed is None."""
    if _uses_triton(logits):
        return _kernels().row_stats(logits, target, weight, acc_dtype, sparse)
    return cpu.row_stats(logits, target, weight, acc_dtype, sparse)


def gradient(logits, index, weight, lse, p, r, t, inplace: bool) -> torch.Tensor:
    """p exp(z_k - lse) - r w_k per logit and t at k = index, in a new tensor or (inplace) over the
    logits; p, r and t are per row."""
    if _uses_triton(logits):
        grad = _kernels().gradient(
            logits, index, weight, lse, p, r, t, out=logits if inplace else torch.empty_like(logits)
        )
        if inplace:  # the kernel wrote behind autograd's back: let it see the logits changed
            torch.autograd.graph.increment_version(logits)
        return grad
    return cpu.gradient(logits, index, weight, lse, p, r, t, inplace)


def forward_gradient(logits, index, weight, scale, smoothing: float, sparse: bool) -> torch.Tensor:
    """The one-pass contract (`algebra`): row losses; the gradient written over the logits."""
    if not _uses_triton(logits):
        return cpu.forward_gradient(logits, index, weight, scale, smoothing, sparse)  # bumps the version
    row_loss = _kernels().forward_gradient(logits, index, weight, scale, smoothing, sparse)
    # Written behind autograd's back: any op that saved the logits for its backward now raises there
    torch.autograd.graph.increment_version(logits)
    return row_loss


def scale_by_upstream(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """grad *= upstream (0-d, or one per row), in place, skipped where the upstream gradient is 1."""
    if _uses_triton(grad):
        return _kernels().scale_rows(grad, upstream)  # decided on the device: no host synchronisation
    if upstream.dim() == 0:
        # On CPU reading the number costs nothing; on a GPU without Triton it would synchronise
        if grad.device.type == "cpu" and not torch.compiler.is_compiling() and upstream.item() == 1:
            return grad
        return grad.mul_(upstream)
    return grad.mul_(upstream.unsqueeze(1))
