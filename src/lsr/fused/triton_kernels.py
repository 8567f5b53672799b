"""Triton kernels of the fused losses (CUDA; CPU tensors too under TRITON_INTERPRET=1, for tests).

Importing this module imports Triton: `lsr.fused` imports it only when a kernel is first needed.
The math the kernels serve is in `lsr.fused.loss`. Per row of logits z (target y, weights w):

    _row_stats_kernel: lse = logsumexp(z), dot = sum_j w_j z_j, z_y         one read of z
    _gradient_kernel:  g_k = p exp(z_k - lse) - r w_k - q [k = y]          one read, one write

One program per row for the statistics, looping over blocks of columns with an online max and
sum-exp, so any class count fits (tested to 262144); one program per (row, column block) for the
gradient. Arithmetic is in the dtype of the statistics (float32, float64 for float64 logits); row
offsets are int64. Nothing synchronises with the host and nothing is allocated inside, so the
launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

STATS_BLOCK = 8192  # columns per step of the row loop
GRADIENT_BLOCK = 4096  # columns per gradient program


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    dot_ptr,
    z_y_ptr,
    n_cols,
    stride_row,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    acc_dtype = lse_ptr.dtype.element_ty
    m = tl.full([], float("-inf"), acc_dtype)  # running max
    s = tl.zeros([], acc_dtype)  # running sum of exp(z - m)
    dot = tl.zeros([], acc_dtype)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row all -inf so far: no inf - inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        m = m_new
        z = tl.where(mask, z, 0.0)
        if HAS_WEIGHT:
            z = z * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
        dot += tl.sum(z, axis=0)
    y = tl.load(target_ptr + row)
    tl.store(lse_ptr + row, m + tl.log(s))
    tl.store(dot_ptr + row, dot)
    tl.store(z_y_ptr + row, tl.load(row_ptr + y).to(acc_dtype))


@triton.jit
def _gradient_kernel(
    logits_ptr,
    grad_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    p_ptr,
    q_ptr,
    r_ptr,
    n_cols,
    stride_logits_row,
    stride_grad_row,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    acc_dtype = lse_ptr.dtype.element_ty
    z = tl.load(logits_ptr + row * stride_logits_row + cols, mask=mask, other=0.0).to(acc_dtype)
    lse = tl.load(lse_ptr + row)
    p = tl.load(p_ptr + row)
    q = tl.load(q_ptr + row)
    r = tl.load(r_ptr + row)
    y = tl.load(target_ptr + row)
    if HAS_WEIGHT:
        r = r * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
    g = p * tl.exp(z - lse) - r - tl.where(cols == y, q, 0.0)
    # Each element is read, then written, by the same program: grad_ptr may alias logits_ptr.
    tl.store(grad_ptr + row * stride_grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_size: int) -> int:
    return 4 if block_size <= 1024 else 8 if block_size <= 4096 else 16


def _device_guard(t: torch.Tensor):
    # Launch on the tensor's GPU, not the current one; CPU tensors (interpreter) need no guard.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def row_stats(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, C) logits (unit class stride), (M,) int64 targets in [0, C) -> lse, dot, z_y, each (M,)."""
    n_rows, n_cols = logits.shape
    lse, dot, z_y = (torch.empty(n_rows, dtype=acc_dtype, device=logits.device) for _ in range(3))
    if n_rows == 0:
        return lse, dot, z_y
    block = min(triton.next_power_of_2(n_cols), STATS_BLOCK)
    with _device_guard(logits):
        _row_stats_kernel[(n_rows,)](
            logits,
            target,
            logits if weight is None else weight,  # not read without weights
            lse,
            dot,
            z_y,
            n_cols,
            logits.stride(0),
            HAS_WEIGHT=weight is not None,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return lse, dot, z_y


def gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write g_k = p exp(z_k - lse) - r w_k - q [k = y] into `out` (which may be `logits` itself)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return out
    block = min(triton.next_power_of_2(n_cols), GRADIENT_BLOCK)
    with _device_guard(logits):
        _gradient_kernel[(n_rows, triton.cdiv(n_cols, block))](
            logits,
            out,
            target,
            logits if weight is None else weight,
            lse,
            p,
            q,
            r,
            n_cols,
            logits.stride(0),
            out.stride(0),
            HAS_WEIGHT=weight is not None,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return out
