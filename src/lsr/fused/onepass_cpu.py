"""The one-pass CPU kernel: each row's loss, and its gradient written over the logits, in one read,
one write and one exp per logit (issue 12; the autograd Function and public API are in lsr.fused).

It computes `forward_gradient` as `lsr.fused.algebra`'s module docstring states it (the one-pass
contract: per row, exact smoothing or equation 15, the gradient for the row's upstream gradient s).

Two implementations of `forward_gradient`, chosen by `backend()`:
- "cpp": csrc/onepass.cpp, compiled at first use with torch.utils.cpp_extension (needs a C++
  compiler and ninja) for the vector ISA torch itself dispatches to here (AVX2, AVX-512, or generic
  code), cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). While a row is in
  cache it sweeps it for the max, writes exp(z - m) while summing, then scales it in place: only
  the first read and the last write go to memory. Half inputs keep exp(z - m) in a float32 row
  buffer. Rows run in parallel on torch's intra-op threads: the build has -fopenmp where torch was
  built with OpenMP (`openmp()`), since at::parallel_for's pragma is ignored without it and the
  kernel would run on one thread; `threads_used()` tells how many threads ran the last call.
- "torch": the same math in plain PyTorch over blocks of rows (temporaries of about
  BLOCK_ELEMENTS logits), the per-row algebra `lsr.fused.algebra`'s; whole tensors on other devices.
"auto" (the default) takes "cpp" for CPU tensors when it builds, "torch" otherwise (with a warning
saying why, once).

Inside a torch.compile region the C++ op is called as one node of the graph: it is registered with
a fake kernel (shapes only) and its schema marks the logits as written (`Tensor(a!)`), so inductor
calls it as an extern kernel and orders the reads of the logits around it. Tracing cannot build or
load it, so it must be loaded before (`extension()`; `FusedLSRLoss(..., gradient_in_forward=True)`
and any eager call do); a trace that finds it unloaded takes the plain-PyTorch version.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from lsr.constants import PAPER_EPS
from lsr.fused import cpu
from lsr.fused.algebra import exact_rows, sparse_rows

BACKENDS = ("auto", "cpp", "torch")
BLOCK_ELEMENTS = 1 << 16
_backend = "auto"

_SOURCE = Path(__file__).parent / "csrc" / "onepass.cpp"
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


def set_backend(name: str) -> str:
    """Choose how `forward_gradient` runs; returns the previous choice.

    Example:
        >>> previous = set_backend("torch")
        >>> set_backend(previous)
        'torch'
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"one-pass CPU backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    return previous


@contextlib.contextmanager
def backend_options(name: str) -> Iterator[None]:
    """Run `forward_gradient` with backend `name` inside a `with` block."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend() -> str:
    """The backend `forward_gradient` uses for CPU tensors now: "cpp" or "torch"."""
    if _backend == "auto":
        return "cpp" if extension() is not None else "torch"
    return _backend


def isa() -> str:
    """The vector ISA the C++ kernel is built for here: "AVX2", "AVX512" or "DEFAULT" (generic)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _ISA_FLAGS else "DEFAULT"


def build_problem() -> str | None:
    """Why the C++ kernel cannot be built here (no compiler, no ninja), or None."""
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
    """Whether the kernel is built with OpenMP: where torch has it, unless LSR_ONEPASS_OPENMP=0 (a
    switch for the test that shows a serial build is caught)."""
    return torch._C.has_openmp and os.environ.get("LSR_ONEPASS_OPENMP", "1") != "0"


def _build_name() -> str:
    """The build's name, hence its cache folder: per ISA, OpenMP and torch version (the cache keys
    builds by source and flags only, and a build for another torch's ABI would load and crash)."""
    version = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"lsr_onepass_{isa().lower()}{'_omp' if openmp() else '_serial'}_torch{version}"


def threads_used() -> int:
    """How many distinct intra-op threads ran rows in the C++ kernel's last call (0 before any)."""
    module = extension()
    if module is None:
        raise RuntimeError(f"the one-pass C++ kernel is unavailable: {build_problem()}")
    return int(module.threads_used())


BUILD_SECONDS: float | None = None  # how long `extension()` took to build or load, once it has
_LOADED = None  # torch.ops.lsr_onepass once `extension()` has loaded it: what a compiled trace reads


def _register_fake() -> None:
    """Shapes for torch.compile's tracing: (M,) row losses in the compute dtype; the logits are
    mutated in place, which the op's schema says."""

    @torch.library.register_fake("lsr_onepass::forward_gradient")
    def _(logits, target, weight, scale, smoothing, sparse, paper_eps):
        acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty(logits.shape[0], dtype=acc_dtype)


@functools.cache
def extension():
    """The compiled kernel's ops, `torch.ops.lsr_onepass` (built at first call, then loaded from the
    cache), or None with a warning when it cannot be built here. With LSR_ONEPASS_CPP=1 (CI) it
    raises instead of falling back."""
    global BUILD_SECONDS, _LOADED
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
                verbose=os.environ.get("LSR_ONEPASS_VERBOSE") == "1",
            )
        except Exception as error:  # a compiler that fails: fall back, saying why
            problem = f"building {_SOURCE.name} failed: {error}"
        else:
            BUILD_SECONDS = time.perf_counter() - start
            if _LOADED is None:  # once per process, however often the cache is cleared
                _register_fake()
            _LOADED = torch.ops.lsr_onepass
            return _LOADED
    if os.environ.get("LSR_ONEPASS_CPP") == "1":
        raise RuntimeError(f"LSR_ONEPASS_CPP=1 but the one-pass C++ kernel is unavailable: {problem}")
    warnings.warn(
        f"the one-pass CPU kernel runs in plain PyTorch (slower): {problem}", RuntimeWarning, stacklevel=3
    )
    return None


# --- entry point -----------------------------------------------------------------------------------


def forward_gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    smoothing: float,
    sparse: bool,
) -> torch.Tensor:
    """Per-row losses (unscaled); overwrites `logits` with the gradient of sum_i scale_i loss_i.

    logits: (M, C) contiguous, float16/bfloat16/float32/float64; target: (M,) int64 in [0, C)
    (not checked here: the caller validates); weight: (C,) or None and scale: (M,) in the compute
    dtype (float32 for half logits, else the logits' dtype); scale is 0 for an ignored row and may
    be NaN. Returns (M,) losses in the compute dtype; the gradient is in the logits' dtype. The
    logits' version counter is bumped, so autograd raises for any op that saved them.

    Example:
        >>> z = torch.tensor([[2.0, 0.5, -1.0]])
        >>> loss = forward_gradient(z, torch.tensor([0]), None, torch.ones(1), 0.0, False)
        >>> torch.allclose(loss, -torch.tensor([2.0, 0.5, -1.0]).log_softmax(0)[0])
        True
        >>> torch.allclose(z.sum(), torch.tensor(0.0), atol=1e-6)  # p - onehot sums to 0
        True
    """
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"logits must be (M, C) and contiguous, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if scale.dtype != acc_dtype or (weight is not None and weight.dtype != acc_dtype):
        raise TypeError(f"scale and weight must be {acc_dtype} for {logits.dtype} logits")
    if sparse and logits.shape[1] < 2:
        raise ValueError("SparseLSR needs at least 2 classes")
    if logits.device.type != "cpu":
        use_cpp = False
    elif torch.compiler.is_compiling():  # a trace cannot build or load the op: it uses it if loaded
        use_cpp = _backend != "torch" and _LOADED is not None
    else:
        use_cpp = backend() == "cpp"
    if use_cpp:
        module = _LOADED if torch.compiler.is_compiling() else extension()
        if module is None:
            raise RuntimeError(f"the one-pass C++ kernel is unavailable: {build_problem()}")
        row_loss = module.forward_gradient(
            logits,
            target.contiguous(),
            None if weight is None else weight.contiguous(),
            scale.contiguous(),
            float(smoothing),
            bool(sparse),
            PAPER_EPS,
        )
        # The op wrote behind autograd's back: bump the version counter, as an in-place torch op
        # does, so that anything that saved the logits for backward raises instead of reading gradients
        torch.autograd.graph.increment_version(logits)
        return row_loss
    if torch.compiler.is_compiling() or logits.device.type != "cpu":
        return _forward_gradient_rows(logits, target, weight, scale, smoothing, sparse)
    row_loss = torch.empty(logits.shape[0], dtype=acc_dtype, device=logits.device)
    step = max(1, BLOCK_ELEMENTS // max(logits.shape[1], 1))
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        row_loss[rows] = _forward_gradient_rows(
            logits[rows], target[rows], weight, scale[rows], smoothing, sparse
        )
    return row_loss


# --- the plain-PyTorch version ------------------------------------------------------------------------


def _forward_gradient_rows(logits, target, weight, scale, smoothing, sparse):
    """`forward_gradient` on a block of rows, as whole-tensor expressions (temporaries of its size)."""
    num_classes = logits.shape[1]
    z = logits.to(scale.dtype)
    index = target.unsqueeze(1)
    e, total, lse = cpu.exp_and_lse(z)
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
