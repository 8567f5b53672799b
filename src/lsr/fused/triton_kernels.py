"""Triton kernels of the fused losses (CUDA; CPU tensors too under TRITON_INTERPRET=1, for tests).

Importing this module imports Triton: `lsr.fused` imports it only when a kernel is first needed.
The math the kernels serve is in `lsr.fused.algebra`. Per row of logits z (target y, weights w):

    _row_stats_kernel: lse = logsumexp(z), z_y, and dot = sum_j w_j z_j      one read of z
                       (exact) or 1 - p_y from the j != y terms (SPARSE)
    _gradient_kernel:  g_k = p exp(z_k - lse) - r w_k, and g_y = t          one read, one write

and for the one-pass mode (gradient_in_forward=True; its contract is in lsr.fused.algebra):

    _forward_gradient_kernel: the row's loss, and its gradient written over z  two reads, one write
    _scale_rows_kernel:       g *= u where the upstream gradient u is not 1    read on the device

Rows are swept in blocks of columns with an online max and sum-exp, so any class count fits (tested
to 262144). Arithmetic is in the dtype of the statistics (float32, float64 for float64 logits); row
offsets are int64. Nothing synchronises with the host and nothing is allocated inside, so the
launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from lsr.constants import PAPER_EPS
from lsr.fused.cpu import RowStats, Weight

STATS_BLOCK = 8192  # columns per step of the row loop
GRADIENT_BLOCK = 4096  # columns per gradient program


@triton.jit
def _online_row_sweep(
    row_ptr,
    y,
    weight_ptr,
    n_cols,
    acc_dtype: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One read of a row: its max m, sum of exp(z - m), that sum over j != y (SPARSE), and sum of
    w_j z_j (not SPARSE), by an online max over blocks of columns. No grid of its own: inlined into
    the program of `_row_stats_kernel` and `_forward_gradient_kernel` that owns the row."""
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
    return m, s, other, dot


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
    """The forward statistics of one row. Grid (M,): program i reads row i of the logits (stride
    stride_row, unit class stride) once, in blocks of BLOCK_SIZE columns, and stores lse[i], z_y[i]
    (NaN for a target outside [0, C)), and dot[i] = sum_j w_j z_j or, SPARSE, one_minus_p_y[i] (the
    other pointer is not written). Outputs are (M,) in the compute dtype, lse's."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(target_ptr + row)
    acc_dtype = lse_ptr.dtype.element_ty
    m, s, other, dot = _online_row_sweep(
        row_ptr, y, weight_ptr, n_cols, acc_dtype, HAS_WEIGHT=HAS_WEIGHT, SPARSE=SPARSE, BLOCK_SIZE=BLOCK_SIZE
    )
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
    """The two-pass backward on one block of one row. Grid (M, cdiv(C, BLOCK_SIZE)): program (i, b)
    reads columns [b BLOCK_SIZE, (b + 1) BLOCK_SIZE) of logits row i and the row's (M,) lse, p, r, t
    and target, and writes g_k = p exp(z_k - lse) - r w_k there, t at k = y, to the same columns of
    grad (in grad's dtype)."""
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


# --- the one-pass mode (gradient_in_forward=True) ---------------------------------------------------


@triton.jit
def _forward_gradient_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    scale_ptr,
    row_loss_ptr,
    n_cols,
    stride_row,
    smoothing_hi,
    smoothing_lo,
    paper_eps_hi,
    paper_eps_lo,
    HAS_WEIGHT: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One row's loss, and its gradient written over it (lsr.fused.algebra, "The one-pass mode").
    Grid (M,): program i sweeps row i in blocks of BLOCK_SIZE columns (C = 262144 does not fit in
    shared memory) twice. Sweep 1: online max m, S = sum exp(z - m), and the sum over j != y (SPARSE)
    or dot = sum w_j z_j. Sweep 2 reads the row again (from L2 where the rows in flight fit there)
    and writes g = s dL/dz over it: two reads, one write and two exps per logit (cheap on a GPU beside
    the memory traffic). Inputs: target, scale s per row, weights and their (0-d) sum; eps and 1e-7
    as float32 (hi, lo) pairs. Output: row_loss[i], unscaled, in the compute dtype."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    y = tl.load(target_ptr + row)  # in [0, C): the caller made bad targets' rows NaN through `scale`
    acc_dtype = row_loss_ptr.dtype.element_ty
    # Float arguments arrive as float32: each constant comes as a float32 pair, exact in float64 too
    zero = tl.zeros([], acc_dtype)  # (zero + x: x in the compute dtype)
    eps = (zero + smoothing_hi) + smoothing_lo
    paper_eps = (zero + paper_eps_hi) + paper_eps_lo
    n = zero + n_cols
    m, total, other, dot = _online_row_sweep(
        row_ptr, y, weight_ptr, n_cols, acc_dtype, HAS_WEIGHT=HAS_WEIGHT, SPARSE=SPARSE, BLOCK_SIZE=BLOCK_SIZE
    )
    lse = m + tl.log(total)
    z_y = tl.load(row_ptr + y).to(acc_dtype)
    s = tl.load(scale_ptr + row)
    if SPARSE:  # alpha = c, gamma = 0, target term: -c (1 - p_y), 1 - p_y from the j != y terms
        a = 1.0 - eps + eps / n
        b = eps * (n - 1.0) / n
        one_minus_p_y = other / total
        guarded = one_minus_p_y + paper_eps
        loss = -a * (z_y - lse) - b * tl.log(guarded / (n - 1.0))
        alpha = a - b * tl.exp(z_y - lse) / guarded
        gamma = 0.0
        beta = 0.0
        target_gradient = -s * alpha * one_minus_p_y
    else:  # alpha = A, gamma = eps/C, target term: A p_y - gamma w_y - beta
        gamma = eps / n
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y).to(acc_dtype)
            beta = (1.0 - eps) * w_y
            alpha = beta + gamma * tl.load(weight_sum_ptr).to(acc_dtype)
        else:
            beta = 1.0 - eps
            alpha = 1.0
        loss = alpha * lse - beta * z_y
        loss -= gamma * tl.where(eps > 0, dot, 0.0)  # at eps = 0 a -inf logit adds nothing (no 0 * inf)
        target_gradient = 0.0  # unused: the target column is g - s beta below
    tl.store(row_loss_ptr + row, loss)
    s_alpha = s * alpha
    s_gamma = s * gamma
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(acc_dtype)
        g = s_alpha * tl.exp(z - lse)  # s alpha p_k
        if HAS_WEIGHT:
            g -= s_gamma * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(acc_dtype)
        elif not SPARSE:
            g -= s_gamma
        if SPARSE:
            g = tl.where(cols == y, target_gradient, g)
        else:
            g = tl.where(cols == y, g - s * beta, g)
        # Each block is read, then written, by this program alone: the write may go over the logits
        tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,
    upstream_ptr,
    stride_upstream,
    n_cols,
    stride_row,
    ACC_DTYPE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The one-pass backward on one block of one row. Grid (M, cdiv(C, BLOCK_SIZE)): program (i, b)
    reads u = upstream[i stride_upstream] (stride 0: one number for every row) and, where u is not 1,
    multiplies columns [b BLOCK_SIZE, (b + 1) BLOCK_SIZE) of grad row i by it, in place."""
    # Reads the upstream gradient on the device, so the host never waits for it; a program whose
    # row's upstream gradient is 1 (the usual loss.backward()) reads one number and does nothing.
    row = tl.program_id(0).to(tl.int64)
    u = tl.load(upstream_ptr + row * stride_upstream).to(ACC_DTYPE)
    if u != 1.0:
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        ptrs = grad_ptr + row * stride_row + cols
        g = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(ptrs, (g * u).to(grad_ptr.dtype.element_ty), mask=mask)


ONEPASS_BLOCK = 4096  # columns per step of the one-pass row loops
SCALE_BLOCK = 4096  # columns per program of the backward's scaling


def _float32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo, two float32 values (Triton passes Python floats as float32)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


def forward_gradient(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Weight,
    scale: torch.Tensor,
    smoothing: float,
    sparse: bool,
) -> torch.Tensor:
    """The one-pass contract (lsr.fused.algebra, "The one-pass mode"): (M, C) logits with unit class
    stride, (M,) int64 targets in [0, C), (C,) weights or None and (M,) scale in the compute dtype
    -> the (M,) unscaled row losses; the logits are overwritten with the gradient of
    sum_i scale_i loss_i."""
    n_rows, n_cols = logits.shape
    row_loss = torch.empty(n_rows, dtype=scale.dtype, device=logits.device)
    if n_rows == 0:
        return row_loss
    block = min(triton.next_power_of_2(n_cols), ONEPASS_BLOCK)
    weight_sum = None if weight is None else weight.sum()  # on the device: no host read
    with _device_guard(logits):
        _forward_gradient_kernel[(n_rows,)](
            logits,
            target,
            logits if weight is None else weight,  # not read without weights
            logits if weight_sum is None else weight_sum,
            scale,
            row_loss,
            n_cols,
            logits.stride(0),
            *_float32_pair(smoothing),
            *_float32_pair(PAPER_EPS),
            HAS_WEIGHT=weight is not None,
            SPARSE=sparse,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return row_loss


def scale_rows(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """grad (M, C) *= upstream, in place: a 0-d upstream for every row, or one per row ((M,), any
    stride). Decided on the device: rows whose upstream gradient is 1 are left as they are."""
    n_rows, n_cols = grad.shape
    if n_rows == 0:
        return grad
    stride_upstream = 0 if upstream.dim() == 0 else upstream.stride(0)
    block = min(triton.next_power_of_2(n_cols), SCALE_BLOCK)
    with _device_guard(grad):
        _scale_rows_kernel[(n_rows, triton.cdiv(n_cols, block))](
            grad,
            upstream,
            stride_upstream,
            n_cols,
            grad.stride(0),
            ACC_DTYPE=tl.float64 if grad.dtype == torch.float64 else tl.float32,
            BLOCK_SIZE=block,
            num_warps=_num_warps(block),
        )
    return grad
