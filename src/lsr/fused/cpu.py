"""The two passes of the fused losses in plain PyTorch: the CPU path, and the fallback on any device.

`row_stats` and `gradient` compute what the Triton kernels in `triton_kernels.py` compute, except
the target column of the gradient, which `passes.gradient` writes afterwards from saved O(N) values
(inside the pass it costs a vectorised int64 compare per element: measured 1.5x slower; SparseLSR's
statistics pay that compare, to sum 1 - p_y from the non-target terms). Written
as whole-tensor expressions they would build N x C temporaries; two ways keep those out:

- "compile": inductor fuses each pass into one vectorised C++ loop nest over rows (OpenMP), with
  shapes marked dynamic, so there is one compilation per dtype and weighting, not one per shape.
- "eager": the same expressions over blocks of rows, so temporaries stay O(EAGER_BLOCK_ELEMENTS).

"auto" (the default) compiles inputs of at least COMPILE_MIN_ELEMENTS logits when a C++ compiler is
on PATH, and runs smaller ones eagerly: below that size compiling does not pay for itself.
docs/fused.md has the measurements behind these choices (benchmarks/fused_cpu_alternatives.py
measures them again); `cpu_options` changes the backend and block size for a `with` block. Inside
a user's `torch.compile` region the plain expressions are traced into the user's graph instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator

import torch

COMPILE_MIN_ELEMENTS = 1 << 18
EAGER_BLOCK_ELEMENTS = 1 << 16
BACKENDS = ("auto", "compile", "eager", "triton")
_backend = "auto"


def set_cpu_backend(name: str) -> str:
    """Choose how the fused losses run on CPU; returns the previous choice.

    "auto" (default), "compile", "eager", or "triton": the Triton kernels on CPU tensors, which only
    the Triton interpreter can run (TRITON_INTERPRET=1 set before Triton is imported; for tests).

    Example:
        >>> previous = set_cpu_backend("eager")
        >>> set_cpu_backend(previous)
        'eager'
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"CPU backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the 'triton' CPU backend needs the Triton interpreter: set TRITON_INTERPRET=1")
    previous, _backend = _backend, name
    return previous


@contextlib.contextmanager
def cpu_options(backend: str | None = None, *, eager_block_elements: int | None = None) -> Iterator[None]:
    """Run the fused losses on CPU with `backend` and eager blocks of about `eager_block_elements`
    logits inside a `with` block (None keeps the current value); both are restored afterwards.

    Example:
        >>> from lsr.fused import cpu
        >>> with cpu_options("eager", eager_block_elements=8):
        ...     cpu.cpu_backend(1 << 30), cpu.EAGER_BLOCK_ELEMENTS
        ('eager', 8)
    """
    global EAGER_BLOCK_ELEMENTS
    previous_block = EAGER_BLOCK_ELEMENTS
    previous_backend = set_cpu_backend(backend) if backend is not None else None
    if eager_block_elements is not None:
        if eager_block_elements < 1:
            raise ValueError(f"eager_block_elements must be at least 1, got {eager_block_elements}")
        EAGER_BLOCK_ELEMENTS = eager_block_elements
    try:
        yield
    finally:
        EAGER_BLOCK_ELEMENTS = previous_block
        if previous_backend is not None:
            set_cpu_backend(previous_backend)


def cpu_backend(num_elements: int) -> str:
    """The backend that runs an input of `num_elements` logits on CPU now."""
    if _backend != "auto":
        return _backend
    return "compile" if num_elements >= COMPILE_MIN_ELEMENTS and cxx_compiler_available() else "eager"


@functools.cache
def cxx_compiler_available() -> bool:
    """Whether a C++ compiler that inductor's CPU code can use is on PATH ($CXX, g++ or clang++)."""
    return any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "clang++"))


# --- the two passes, as expressions ---------------------------------------------------------------


def exp_and_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e = exp(z - m) per logit, its row sums S and lse = m + log S per row, m the row's max."""
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row of -inf only: lse = -inf, not NaN
    e = (z - m).exp()
    total = e.sum(dim=1)
    return e, total, m.squeeze(1) + total.log()


def _row_stats(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, acc_dtype: torch.dtype, sparse: bool
):
    """lse, and dot = sum_j w_j z_j (exact) or 1 - p_y from the non-target terms (sparse); the other None."""
    z = z.to(acc_dtype)
    e, total, lse = exp_and_lse(z)
    if not sparse:
        return lse, (z if weight is None else z * weight).sum(dim=1), None
    # A compare per element, not a gather: a target outside [0, C) excludes nothing here
    classes = torch.arange(z.shape[1], device=z.device)
    non_target = torch.where(classes != target.unsqueeze(1), e, 0.0).sum(dim=1)
    return lse, None, non_target / total


def _gradient(z: torch.Tensor, weight: torch.Tensor | None, lse, p, r) -> torch.Tensor:
    """p exp(z - lse) - r w per element (the target column is fixed afterwards)."""
    rw = r.unsqueeze(1) if weight is None else r.unsqueeze(1) * weight
    return (p.unsqueeze(1) * (z.to(lse.dtype) - lse.unsqueeze(1)).exp() - rw).to(z.dtype)


def _gradient_into_logits(z: torch.Tensor, weight: torch.Tensor | None, lse, p, r) -> torch.Tensor:
    return z.copy_(_gradient(z, weight, lse, p, r))


# Each pass compiles once per dtype, weighting and loss (up to 4 x 2 x 2 variants). At dynamo's default
# limit of 8, the ninth would silently run the plain expressions on the whole tensor (N x C
# temporaries); fullgraph=True makes running past this limit an error instead.
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn):
    # dynamic_threads: always emit an OpenMP region. Otherwise inductor picks serial or parallel
    # loops from the sizes of the first input it compiles for, and its cache hands that choice to
    # every later shape (a first, tiny input made 4096 x 10000 run on one thread: 2x slower).
    return torch.compile(
        fn,
        dynamic=True,
        fullgraph=True,
        recompile_limit=RECOMPILE_LIMIT,
        options={"cpp.dynamic_threads": True},
    )


# --- entry points ------------------------------------------------------------------------------------


Weight = torch.Tensor | None  # (C,) class weights, in the compute dtype
# lse, z_y, and dot (exact smoothing) or 1 - p_y (SparseLSR), each (M,); the one not computed is None
RowStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def row_stats(
    logits: torch.Tensor, target: torch.Tensor, weight: Weight, acc_dtype: torch.dtype, sparse: bool
) -> RowStats:
    """(M, C) contiguous logits, (M,) int64 targets -> lse, z_y, dot (exact) and 1 - p_y (sparse).

    A target outside [0, C) raises here (PyTorch's bounds check, run eagerly), except on the plain
    path (traced into a compiled graph, or on a GPU without Triton), where a failed bounds check
    aborts the process or the device: there it reads class 0, and the row is made NaN (`algebra`).
    """
    backend = _backend_for(logits)
    index = target.clamp(0, logits.shape[1] - 1) if backend == "plain" else target
    z_y = logits.gather(1, index.unsqueeze(1)).squeeze(1).to(acc_dtype)
    if backend == "compile":
        stats = _compiled(_row_stats)(logits, target, weight, acc_dtype, sparse)
    elif backend == "plain":
        stats = _row_stats(logits, target, weight, acc_dtype, sparse)
    else:
        blocks = [_row_stats(logits[r], target[r], weight, acc_dtype, sparse) for r in _row_blocks(logits)]
        stats = [None if parts[0] is None else torch.cat(parts) for parts in zip(*blocks, strict=True)]
    lse, dot, one_minus_p_y = stats
    return lse, z_y, dot, one_minus_p_y


def gradient(
    logits: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    p: torch.Tensor,
    r: torch.Tensor,
    inplace: bool,
) -> torch.Tensor:
    """p exp(z - lse) - r w for every logit, in a new tensor or (inplace) over the logits."""
    fn = _gradient_into_logits if inplace else _gradient
    backend = _backend_for(logits)
    if backend == "compile":
        return _compiled(fn)(logits, weight, lse, p, r)
    if backend == "plain":
        return fn(logits, weight, lse, p, r)
    grad = logits if inplace else torch.empty_like(logits)
    for rows in _row_blocks(logits):
        grad[rows] = _gradient(logits[rows], weight, lse[rows], p[rows], r[rows])
    return grad


def _backend_for(logits: torch.Tensor) -> str:
    if torch.compiler.is_compiling():
        return "plain"  # traced into the caller's graph, which inductor fuses anyway
    if logits.device.type != "cpu":
        return "plain"  # a GPU without Triton: correct, not fused (N x C temporaries)
    if logits.numel() == 0:
        return "plain"
    return cpu_backend(logits.numel())


def _row_blocks(logits: torch.Tensor):
    n_rows, n_cols = logits.shape
    step = max(1, EAGER_BLOCK_ELEMENTS // max(n_cols, 1))
    return (slice(start, start + step) for start in range(0, n_rows, step))
