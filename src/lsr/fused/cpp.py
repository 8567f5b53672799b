"""The fused losses' C++ kernels on CPU (csrc/fused.cpp): one op per pass over the logits, as
`passes.py` names them, each computing what `algebra.py` states.

- `row_stats`: lse, and dot (exact) or 1 - p_y (SparseLSR) per row, in one read;
- `gradient`: p exp(z_k - lse) - r w_k and t on the target column, in one read and one write, into
  new memory or over the logits;
- `forward_gradient`: the one-pass mode's row losses, the gradient written over the logits (one read,
  one write, one exp per logit).

Compiled at first use with torch.utils.cpp_extension (needs a C++ compiler and ninja) for the vector
ISA torch itself dispatches to here (AVX2, AVX-512, or generic code), cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). While a row is in cache each op sweeps it
for the max, then for the exps, then writes: only the first read and the last write go to memory.
Half inputs are widened to float32 as they are read; the one-pass mode keeps exp(z - m) of a half row
in a float32 row buffer from torch's allocator (so the peak-memory meter counts it). Rows run in
parallel on torch's intra-op threads: the build has -fopenmp where torch was built with OpenMP
(`openmp()`), since at::parallel_for's pragma is ignored without it and the kernels would run on one
thread; `threads_used()` tells how many threads ran the last call.

`cpu.py` decides when these run (its "cpp" backend, which "auto" takes where they build) and holds
the plain-PyTorch fallbacks. Inside a torch.compile region an op is one node of the graph: each is
registered with a fake kernel (shapes only), and the schemas mark what they write (`Tensor(a!)`), so
inductor calls them as extern kernels and orders reads around them. Tracing cannot build or load the
library, so it must be loaded before (`extension()`; the fused loss modules and any eager call do).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from lsr.constants import PAPER_EPS

_SOURCE = Path(__file__).parent / "csrc" / "fused.cpp"
# The kernel uses at::vec::Vectorized, whose width CPU_CAPABILITY selects, as in torch's own kernels:
# flags for the ISA torch dispatches to here (never -march=native, so a cached build runs on any host
# of that ISA); anything else gets ATen's generic (compiler-vectorised) code.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
        "-DCPU_CAPABILITY=AVX512",
    ],
}


def isa() -> str:
    """The vector ISA the C++ kernels are built for here: "AVX2", "AVX512" or "DEFAULT" (generic)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def build_problem() -> str | None:
    """Why the C++ kernels cannot be built here (no compiler, no ninja), or None."""
    compilers = (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")
    if not any(shutil.which(cxx) for cxx in compilers):
        return "no C++ compiler on PATH"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def openmp() -> bool:
    """Whether the kernels are built with OpenMP: where torch has it, unless LSR_CPP_OPENMP=0 (a
    switch for the test that shows a serial build is caught)."""
    return torch._C.has_openmp and os.environ.get("LSR_CPP_OPENMP", "1") != "0"


def _build_name() -> str:
    """The build's name, hence its cache folder: per ISA, OpenMP and torch version (the cache keys
    builds by source and flags only, and a build for another torch's ABI would load and crash)."""
    version = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"lsr_fused_{isa().lower()}{'_omp' if openmp() else '_serial'}_torch{version}"


def threads_used() -> int:
    """How many distinct intra-op threads ran rows in the last call of a C++ kernel (0 before any)."""
    module = extension()
    if module is None:
        raise RuntimeError(f"the C++ kernels are unavailable: {_FAILURE or build_problem()}")
    return int(module.threads_used())


BUILD_SECONDS: float | None = None  # how long `extension()` took to build or load, once it has
_LOADED = None  # torch.ops.lsr_fused once `extension()` has loaded it: what a compiled trace reads
_FAILURE: str | None = None  # why the last `extension()` returned None (a failed build, say)


def _register_fake() -> None:
    """Shapes for torch.compile's tracing: per-row outputs in the compute dtype; what an op writes
    (`out`, the one-pass logits) its schema says."""

    def per_row(logits):
        acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty(logits.shape[0], dtype=acc_dtype)

    @torch.library.register_fake("lsr_fused::row_stats")
    def _(logits, target, weight, sparse):
        return per_row(logits), per_row(logits)

    @torch.library.register_fake("lsr_fused::gradient")
    def _(logits, target, weight, lse, p, r, t, out):
        return None

    @torch.library.register_fake("lsr_fused::forward_gradient")
    def _(logits, target, weight, scale, smoothing, sparse, paper_eps):
        return per_row(logits)

    def reduced(logits, reduction):  # in the logits' dtype
        shape = (logits.shape[0],) if reduction == "none" else ()
        return logits.new_empty(shape)

    @torch.library.register_fake("lsr_fused::loss_forward")
    def _(logits, target, weight, smoothing, sparse, reduction, ignore_index, validate, paper_eps):
        return reduced(logits, reduction), per_row(logits), per_row(logits), per_row(logits), per_row(logits)

    @torch.library.register_fake("lsr_fused::loss_backward")
    def _(logits, target, weight, lse, alpha, tau, share, gamma, grad_output, out):
        return None

    @torch.library.register_fake("lsr_fused::onepass_loss")
    def _(logits, target, weight, smoothing, sparse, reduction, ignore_index, validate, paper_eps):
        return reduced(logits, reduction)


@functools.cache
def extension():
    """The compiled kernels' ops, `torch.ops.lsr_fused` (built at first call, then loaded from the
    cache), or None with a warning when they cannot be built here. With LSR_CPP=1 (CI) it raises
    instead of falling back."""
    global BUILD_SECONDS, _LOADED, _FAILURE
    problem = build_problem()
    if problem is None:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        # As torch's own build (module docstring). The library links libgomp.so.1, which resolves to
        # the one torch loaded: one OpenMP runtime, one thread pool, torch.set_num_threads obeyed.
        parallel = ["-fopenmp"] if openmp() else []
        try:
            load(
                name=_build_name(),
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", *parallel, *_ISA_FLAGS.get(isa(), [])],
                extra_ldflags=parallel,
                is_python_module=False,  # a dispatcher op library (TORCH_LIBRARY), loaded into torch.ops
                verbose=os.environ.get("LSR_CPP_VERBOSE") == "1",
            )
        except Exception as error:  # a compiler that fails: fall back, saying why
            problem = f"building {_SOURCE.name} failed: {error}"
        else:
            BUILD_SECONDS = time.perf_counter() - start
            if _LOADED is None:  # once per process, however often the cache is cleared
                _register_fake()
            _LOADED = torch.ops.lsr_fused
            return _LOADED
    _FAILURE = problem
    if os.environ.get("LSR_CPP") == "1":
        raise RuntimeError(f"LSR_CPP=1 but the C++ kernels are unavailable: {problem}")
    warnings.warn(
        f"the fused losses run in compiled or plain PyTorch on CPU (slower): {problem}",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def available() -> bool:
    """Whether the ops can run now: built and loaded (building them if needed), or, inside a
    torch.compile trace, loaded before it began."""
    if torch.compiler.is_compiling():
        return _LOADED is not None
    return extension() is not None


def _ops():
    ops = _LOADED if torch.compiler.is_compiling() else extension()
    if ops is None:
        raise RuntimeError(f"the C++ kernels are unavailable: {_FAILURE or build_problem()}")
    return ops


# --- entry points: (M, C) contiguous CPU logits, (M,) int64 targets (in [0, C) for the per-pass ops,
# as given for the whole-pass ones, which check them),
# weights (C,) or None and per-row values in the compute dtype (float32 for half logits) -------------


def row_stats(logits, target, weight, sparse: bool):
    """lse, and dot = sum_j w_j z_j (exact) or 1 - p_y from the non-target terms (sparse), per row."""
    return _ops().row_stats(logits, target.contiguous(), _contiguous(weight), bool(sparse))


def gradient(logits, target, weight, lse, p, r, t, out: torch.Tensor) -> torch.Tensor:
    """out = p exp(z - lse) - r w per logit, t at the target column; `out` may be the logits."""
    _ops().gradient(logits, target.contiguous(), _contiguous(weight), lse, p, r, t, out)
    # Written behind autograd's back: bump the version counter, as an in-place torch op does, so that
    # anything that saved the logits (when out is the logits) raises instead of reading gradients
    torch.autograd.graph.increment_version(out)
    return out


def forward_gradient(logits, target, weight, scale, smoothing: float, sparse: bool) -> torch.Tensor:
    """The one-pass contract (`algebra`): (M,) row losses; the gradient of sum_i scale_i L_i written
    over the logits."""
    row_loss = _ops().forward_gradient(
        logits,
        target.contiguous(),
        _contiguous(weight),
        scale.contiguous(),
        float(smoothing),
        bool(sparse),
        PAPER_EPS,
    )
    torch.autograd.graph.increment_version(logits)  # as in `gradient`
    return row_loss


def loss_forward(
    logits, target, weight, smoothing: float, sparse: bool, reduction: str, ignore_index: int, validate: bool
):
    """The two-pass forward in one call: the loss in the logits' dtype (0-d, or (M,) row losses for
    "none") and, per row, lse, alpha, tau and the row's share of a backward of 1, which
    `loss_backward` reads. (M,) int64 targets as given: ignore_index or a class; with `validate`
    any other value raises ValueError, without it makes its row NaN."""
    args = _loss_args(target, weight, smoothing, sparse, reduction, ignore_index, validate)
    return _ops().loss_forward(logits, *args)


def loss_backward(logits, target, weight, lse, alpha, tau, share, gamma: float, grad_output, out):
    """The two-pass backward in one call: the gradient for `grad_output` written into `out` (which
    may be the logits)."""
    _ops().loss_backward(
        logits,
        target.contiguous(),
        _contiguous(weight),
        lse,
        alpha,
        tau,
        share,
        float(gamma),
        grad_output,
        out,
    )
    torch.autograd.graph.increment_version(out)  # as in `gradient`
    return out


def onepass_loss(
    logits, target, weight, smoothing: float, sparse: bool, reduction: str, ignore_index: int, validate: bool
) -> torch.Tensor:
    """The one-pass forward in one call: the loss as `loss_forward` gives it; the gradient for a
    backward of 1 written over the logits."""
    args = _loss_args(target, weight, smoothing, sparse, reduction, ignore_index, validate)
    loss = _ops().onepass_loss(logits, *args)
    torch.autograd.graph.increment_version(logits)  # as in `gradient`
    return loss


def _loss_args(target, weight, smoothing, sparse, reduction, ignore_index, validate) -> tuple:
    """What `loss_forward` and `onepass_loss` take after the logits, as their schemas type it."""
    return (
        target.contiguous(),
        _contiguous(weight),
        float(smoothing),
        bool(sparse),
        reduction,
        int(ignore_index),
        bool(validate),
        PAPER_EPS,
    )


def sweep_exp(x: torch.Tensor) -> torch.Tensor:
    """The exp the kernels' sweeps use, elementwise (float32 or float64), for testing its accuracy."""
    return _ops().sweep_exp(x.contiguous())


def _contiguous(weight):
    return None if weight is None else weight.contiguous()
