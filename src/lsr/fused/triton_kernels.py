"""Triton kernels of the fused losses (CUDA; CPU tensors too under TRITON_INTERPRET=1, for tests).

Importing this module imports Triton: `lsr.fused` imports it only when a kernel is first needed.
The math the kernels serve is in `lsr.fused.loss`. Per row of logits z (target y, weights w):

    _row_stats_kernel: lse = logsumexp(z), z_y, and dot = sum_j w_j z_j      one read of z
                       (exact) or 1 - p_y from the j != y terms (SPARSE)
    _gradient_kernel:  g_k = p exp(z_k - lse) - r w_k, and g_y = t          one read, one write

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

from lsr.fused.cpu import RowStats, Weight

STATS_BLOCK = 8192  # columns per step of the row loop
GRADIENT_BLOCK = 4096  # columns per gradient program


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    z_y_ptr,
    dot_ptr,
    one_minus_p_y_ptr,
    n_cols,
    stride_row,
    HAS_WEIGHT: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(target_ptr + row)
    acc_dtype = lse_ptr.dtype.element_ty
    m = tl.full([], float("-inf"), acc_dtype)  # running max
    s = tl.zeros([], acc_dtype)  # running sum of exp(z - m)
    other = tl.zeros([], acc_dtype)  # the same over j != y (SPARSE)
    dot = tl.zeros([], acc_dtype)  # sum of w_j z_j (not SPARSE)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row all -inf so far: no inf - inf
        rescale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
        if SPARSE:
            other = other * rescale + tl.sum(tl.where(cols != y, e, 0.0), axis=0)
        else:
            z = tl.where(mask, z, 0.0)
            if HAS_WEIGHT:
                z = z * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
            dot += tl.sum(z, axis=0)
    tl.store(lse_ptr + row, m + tl.log(s))
    # Never read outside the row: a target outside [0, C) (unvalidated) gets NaN, and so does its loss
    in_row = (y >= 0) & (y < n_cols)
    tl.store(z_y_ptr + row, tl.load(row_ptr + y, mask=in_row, other=float("nan")).to(acc_dtype))
    if SPARSE:
        tl.store(one_minus_p_y_ptr + row, other / s)
    else:
        tl.store(dot_ptr + row, dot)


@triton.jit
def _gradient_kernel(
    logits_ptr,
    grad_ptr,
    target_ptr,
    weight_ptr,
    lse_ptr,
    p_ptr,
    r_ptr,
    t_ptr,
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
    r = tl.load(r_ptr + row)
    t = tl.load(t_ptr + row)
    y = tl.load(target_ptr + row)
    if HAS_WEIGHT:
        r = r * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
    g = tl.where(cols == y, t, p * tl.exp(z - lse) - r)
    # Each element is read, then written, by the same program: grad_ptr may alias logits_ptr.
    tl.store(grad_ptr + row * stride_grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_size: int) -> int:
    return 4 if block_size <= 1024 else 8 if block_size <= 4096 else 16


def _device_guard(t: torch.Tensor):
    # Launch on the tensor's GPU, not the current one; CPU tensors (interpreter) need no guard.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def row_stats(
    logits: torch.Tensor, target: torch.Tensor, weight: Weight, acc_dtype: torch.dtype, sparse: bool
) -> RowStats:
    """(M, C) logits (unit class stride), (M,) int64 targets -> lse, z_y, dot (exact) and 1 - p_y
    (sparse), each (M,); the one not computed is None."""
    n_rows, n_cols = logits.shape
    lse, z_y, third = (torch.empty(n_rows, dtype=acc_dtype, device=logits.device) for _ in range(3))
    dot, one_minus_p_y = (None, third) if sparse else (third, None)
    if n_rows == 0:
        return lse, z_y, dot, one_minus_p_y
    block = min(triton.next_power_of_2(n_cols), STATS_BLOCK)
    with _device_guard(logits):
        _row_stats_kernel[(n_rows,)](
            logits,
            target,
            logits if weight is None else weight,  # not read without weights
            lse,
            z_y,
            third,
            third,
            n_cols,
            logits.stride(0),
            HAS_WEIGHT=weight is not None,
            SPARSE=sparse,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return lse, z_y, dot, one_minus_p_y


def gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    p: torch.Tensor,
    r: torch.Tensor,
    t: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write g_k = p exp(z_k - lse) - r w_k, and t at k = y, into `out` (which may be `logits` itself)."""
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
            r,
            t,
            n_cols,
            logits.stride(0),
            out.stride(0),
            HAS_WEIGHT=weight is not None,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return out
