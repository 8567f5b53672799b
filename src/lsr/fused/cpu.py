"""The passes of the fused losses on CPU, and their plain-PyTorch versions (the fallback on any device).

Where a C++ compiler and ninja are at hand, the C++ kernels (`cpp.py`, csrc/fused.cpp) run every
pass: `row_stats`, `gradient` (new memory or in place) and the one-pass `forward_gradient`. Without
them, the same math as PyTorch expressions; written over whole tensors they would build N x C
temporaries, and two ways keep those out:

- "compile": inductor fuses each two-pass pass into one vectorised C++ loop nest over rows (OpenMP),
  with shapes marked dynamic, so there is one compilation per dtype and weighting, not one per shape;
- "eager": the expressions over blocks of rows, so temporaries stay O(EAGER_BLOCK_ELEMENTS).

"auto" (the default) takes "cpp" where the kernels build; otherwise it compiles inputs of at least
COMPILE_MIN_ELEMENTS logits when a C++ compiler is on PATH and runs smaller ones eagerly (below that
size compiling does not pay for itself). The one-pass mode has no compiled version: "compile" runs it
eagerly. The plain expressions compute the target column of the gradient afterwards
(`passes.gradient` writes it from saved O(N) values; inside the pass it costs a vectorised int64
compare per element). docs/fused.md has the measurements behind these choices
(benchmarks/fused_cpu_alternatives.py measures them again); `cpu_options` changes the backend and
block size for a `with` block. Inside a user's `torch.compile` region the C++ ops are called as graph
nodes where they were loaded before the trace, else the plain expressions are traced into the graph.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator

import torch

from lsr.fused import cpp
from lsr.fused.algebra import exact_rows, sparse_rows

COMPILE_MIN_ELEMENTS = 1 << 18
EAGER_BLOCK_ELEMENTS = 1 << 16
BACKENDS = ("auto", "cpp", "compile", "eager", "triton")
_backend = "auto"


def set_cpu_backend(name: str) -> str:
    """Choose how the fused losses run on CPU; returns the previous choice.

    "auto" (default), "cpp", "compile", "eager", or "triton": the Triton kernels on CPU tensors,
    which only the Triton interpreter can run (TRITON_INTERPRET=1 set before Triton is imported; for
    tests).

    Example:
        >>> previous = set_cpu_backend("eager")
        >>> set_cpu_backend(previous)
        'eager'
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"CPU backend must be one of {BACKENDS}, got {name!r}")
    if name == "cpp" and not cpp.available():
        raise ValueError(f"the 'cpp' CPU backend is unavailable here: {cpp.build_problem()}")
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
    if cpp.available():
        return "cpp"
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

    A target outside [0, C) raises here (PyTorch's bounds check, run eagerly), except in a compiled
    graph or on a GPU without Triton, where a failed bounds check aborts the process or the device:
    there it reads class 0, and the row is made NaN (`algebra`).
    """
    backend = _backend_for(logits)
    traced = backend == "plain" or torch.compiler.is_compiling()
    index = target.clamp(0, logits.shape[1] - 1) if traced else target
    z_y = logits.gather(1, index.unsqueeze(1)).squeeze(1).to(acc_dtype)  # raises for a bad target, eagerly
    if backend == "cpp":
        lse, third = cpp.row_stats(logits, index, weight, sparse)
        return (lse, z_y, None, third) if sparse else (lse, z_y, third, None)
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
    index: torch.Tensor,
    weight: Weight,
    lse: torch.Tensor,
    p: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    inplace: bool,
) -> torch.Tensor:
    """p exp(z - lse) - r w for every logit and t at column `index` (targets, in range), per row;
    in a new tensor or (inplace) over the logits."""
    backend = _backend_for(logits)
    if backend == "cpp" and not (inplace and torch.compiler.is_compiling()):
        # (in a trace, `out` aliasing the logits would be a write through an input it says it only reads)
        return cpp.gradient(
            logits, index, weight, lse, p, r, t, out=logits if inplace else torch.empty_like(logits)
        )
    fn = _gradient_into_logits if inplace else _gradient
    if backend == "compile":
        grad = _compiled(fn)(logits, weight, lse, p, r)
    elif backend in ("plain", "cpp"):
        grad = fn(logits, weight, lse, p, r)
    else:
        grad = logits if inplace else torch.empty_like(logits)
        for rows in _row_blocks(logits):
            grad[rows] = _gradient(logits[rows], weight, lse[rows], p[rows], r[rows])
    return grad.scatter_(1, index.unsqueeze(1), t.to(grad.dtype).unsqueeze(1))


def forward_gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Weight,
    scale: torch.Tensor,
    smoothing: float,
    sparse: bool,
) -> torch.Tensor:
    """The one-pass contract (`algebra`): (M,) row losses, the gradient of sum_i scale_i L_i written
    over the (M, C) contiguous logits; targets in [0, C) (the caller validates)."""
    backend = _backend_for(logits)
    if backend == "cpp":
        return cpp.forward_gradient(logits, target, weight, scale, smoothing, sparse)
    if backend == "plain":
        return _forward_gradient_rows(logits, target, weight, scale, smoothing, sparse)
    row_loss = torch.empty(logits.shape[0], dtype=scale.dtype, device=logits.device)
    for rows in _row_blocks(logits):
        row_loss[rows] = _forward_gradient_rows(
            logits[rows], target[rows], weight, scale[rows], smoothing, sparse
        )
    return row_loss


def _forward_gradient_rows(logits, target, weight, scale, smoothing, sparse):
    """`forward_gradient` on a block of rows, as whole-tensor expressions (temporaries of its size)."""
    num_classes = logits.shape[1]
    z = logits.to(scale.dtype)
    index = target.unsqueeze(1)
    e, total, lse = exp_and_lse(z)
    z_y = z.gather(1, index).squeeze(1)
    if sparse:
        one_minus_p_y = e.scatter(1, index, 0.0).sum(dim=1) / total  # the non-target terms
        row_loss, alpha, gamma, tau = sparse_rows(lse, z_y, one_minus_p_y, smoothing, num_classes)
    else:
        w_y = None if weight is None else weight[target]
        # exact_rows reads dot only where eps > 0: no N x C pass for it otherwise
        dot = (z if weight is None else z * weight).sum(dim=1) if smoothing > 0 else None
        row_loss, alpha, gamma, tau = exact_rows(lse, dot, z_y, w_y, weight, smoothing, num_classes)
    s = scale
    # s alpha p_k - s gamma w_k from e, not exp(z - lse): one exp per logit
    grad = (s * alpha / total).unsqueeze(1) * e
    if gamma != 0:  # 0 for SparseLSR and at eps = 0: skip an N x C pass
        grad = grad - (s * gamma).unsqueeze(1) * (1.0 if weight is None else weight)
    grad = grad.scatter(1, index, (s * tau).unsqueeze(1))
    logits.copy_(grad)
    return row_loss


def _backend_for(logits: torch.Tensor) -> str:
    if logits.device.type != "cpu":
        return "plain"  # a GPU without Triton: correct, not fused (N x C temporaries)
    if torch.compiler.is_compiling():
        # In the caller's graph: the C++ ops as nodes where they were loaded before the trace, else
        # the plain expressions, which inductor fuses anyway
        return "cpp" if _backend in ("auto", "cpp") and cpp.available() else "plain"
    if logits.numel() == 0:
        return "plain"
    return cpu_backend(logits.numel())


def _row_blocks(logits: torch.Tensor):
    n_rows, n_cols = logits.shape
    step = max(1, EAGER_BLOCK_ELEMENTS // max(n_cols, 1))
    return (slice(start, start + step) for start in range(0, n_rows, step))
