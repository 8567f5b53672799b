"""The LM head with label smoothing, never holding the logits: `linear_label_smoothing(hidden,
lm_weight, target, smoothing)` is `F.cross_entropy(F.linear(hidden, lm_weight, bias), target,
label_smoothing=smoothing)` (or SparseLSR, equation 15, on those logits with `sparse=True`) computed a
chunk of rows at a time.

Per chunk of R rows: logits = hidden_chunk @ lm_weight^T (+ bias), R x V; the one-pass kernel
(`lsr.fused.passes.forward_gradient`: C++ on CPU, Triton on CUDA) turns them, in place, into the
row losses and the gradient g of the loss with respect to them, for each row's share s_i of a
backward of 1 (1/denominator for "mean", 1 for "sum", 0 for an ignored row); then the chunk's two
backward GEMMs: d_hidden_chunk = g @ lm_weight, d_lm_weight += g^T @ hidden_chunk, d_bias += sum g.
Only one chunk of logits is ever alive, so the peak above the inputs and their gradients is about
R x V x itemsize (the default R: an eighth of the rows, at least MIN_CHUNK_ROWS, at most CHUNK_BYTES
of float32 logits; on a CPU without half-precision matrix units, half weights add the chunk's logits
in float32 for its d_lm_weight product), plus for bfloat16/float16 weights and
more than one chunk a float32 d_lm_weight accumulator (V x H x 4 bytes: a stated choice, so that
the chunks' sums keep their digits). The smoothing term needs no extra pass: the kernel sums each row while it is in cache.

Reductions "mean" and "sum" compute the gradients in the forward pass (when a gradient is needed)
and the backward pass only scales them by the upstream scalar. "none" cannot: d_lm_weight sums over
rows weighted by each row's upstream gradient, known only in backward, so the forward pass computes
the losses alone and the backward pass recomputes the chunks with the upstream gradients as s_i.
Under `torch.no_grad()` the forward pass is one GEMM and the loss pass per chunk, no gradient GEMM.
"""

from __future__ import annotations

import functools

import torch

from lsr._common import (
    LabelSmoothingLoss,
    check_reduction,
    check_smoothing,
    check_targets,
    check_weight,
    compute_dtype,
)
from lsr.fused import passes
from lsr.fused.algebra import in_range, mean_denominator, reduce_rows, row_upstream

CHUNK_BYTES = 256 * 2**20  # the most float32 logits a default chunk holds: a few hundred MB
CHUNK_FRACTION = 8  # a default chunk holds at most an eighth of the rows...
MIN_CHUNK_ROWS = 256  # ...but no fewer than this: GEMMs of fewer rows lose efficiency


def default_chunk_rows(num_classes: int, num_rows: int | None = None) -> int:
    """Rows per chunk: an eighth of `num_rows` (all of them below MIN_CHUNK_ROWS), at least
    MIN_CHUNK_ROWS, and at most CHUNK_BYTES of float32 logits. Measured on a 2-core Xeon (N 2048,
    H 256, V 32000): 256-row chunks take the time of one 2048-row chunk in float32 and bfloat16,
    at a quarter of the peak (64 against 283 MiB float32, 95 against 392 MiB bfloat16).

    >>> default_chunk_rows(32000), default_chunk_rows(32000, 2048), default_chunk_rows(32000, 100)
    (2097, 256, 256)
    """
    most = max(1, CHUNK_BYTES // (4 * num_classes))
    if num_rows is None:
        return most
    return min(most, max(MIN_CHUNK_ROWS, -(-num_rows // CHUNK_FRACTION)))


def _chunk_pass(hidden, lm_weight, bias, target, weight, scale, smoothing, sparse, chunk_rows, grads):
    """Row losses (unscaled, in the compute dtype) of every chunk; where `grads` is given as
    (d_hidden, d_weight, d_bias or None), the gradients of sum_i scale_i loss_i accumulated into it."""
    n_rows = hidden.shape[0]
    row_loss = torch.empty(n_rows, dtype=compute_dtype(hidden.dtype), device=hidden.device)
    if grads is not None and n_rows == 0:
        for grad in grads[1:]:
            if grad is not None:
                grad.zero_()
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        logits = torch.nn.functional.linear(hidden[rows], lm_weight, bias)  # R x V: the one alive
        row_loss[rows] = passes.forward_gradient(logits, target[rows], weight, scale[rows], smoothing, sparse)
        if grads is not None:
            d_hidden, d_weight, d_bias = grads
            first = start == 0  # the accumulators start as the first chunk's terms: no zero fill
            torch.matmul(logits, lm_weight, out=d_hidden[rows])
            beta = 0.0 if first else 1.0
            if d_weight.dtype == logits.dtype:
                d_weight.addmm_(logits.t(), hidden[rows], beta=beta)
            elif logits.device.type == "cpu" and not cpu_has_half_matrix_units():
                # Half weights on a CPU without half-precision matrix units: the chunk's product in
                # float32, straight into the float32 sum. Torch's half GEMM there computes into a
                # float32 V x H buffer of its own and runs 5x slower than float32 (the Xeon of
                # results/head), so the chunk's float32 copy costs less time and memory.
                d_weight.addmm_(logits.t().float(), hidden[rows].float(), beta=beta)
            else:  # half weights: each chunk's V x H product in their dtype, summed in float32
                _accumulate(d_weight, torch.mm(logits.t(), hidden[rows]), first)
            if d_bias is not None:
                _accumulate(d_bias, logits.sum(0, dtype=d_bias.dtype), first)
        del logits
    return row_loss


@functools.cache
def cpu_has_half_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16/float16 matrices in hardware (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _accumulate(total: torch.Tensor, term: torch.Tensor, first: bool) -> None:
    if first:
        total.copy_(term)
    else:
        total.add_(term)


def _empty_grads(hidden, lm_weight, bias, chunk_rows):
    """d_hidden in the hidden's dtype; d_lm_weight and d_bias accumulated in at least float32, except
    d_lm_weight of a single chunk: its one product is the result, rounded once either way (a float32
    copy would add two passes over V x H and V x H x 4 bytes: 29 ms of a bfloat16 step here)."""
    acc = compute_dtype(lm_weight.dtype)
    single_chunk = hidden.shape[0] <= chunk_rows
    d_weight = torch.empty(  # set by the first chunk
        lm_weight.shape, dtype=lm_weight.dtype if single_chunk else acc, device=lm_weight.device
    )
    d_bias = None if bias is None else torch.empty(bias.shape, dtype=acc, device=bias.device)
    return torch.empty_like(hidden), d_weight, d_bias


class LinearLabelSmoothingFunction(torch.autograd.Function):
    """(N, H) hidden, (V, H) lm_weight, (V,) bias or None -> the reduced loss (see the module). The
    per-row algebra around the chunks is the fused losses' (`lsr.fused.algebra`): ignored rows 0,
    a target outside [0, V) a NaN row (never read), the mean over F.cross_entropy's denominator."""

    @staticmethod
    def forward(
        ctx, hidden, lm_weight, bias, target, valid, weight, smoothing, sparse, reduction, chunk_rows
    ):
        acc_dtype = compute_dtype(hidden.dtype)
        target_ok, index = in_range(target, lm_weight.shape[0])
        w_y = None if weight is None else weight[index]
        denominator = mean_denominator(valid, w_y, acc_dtype) if reduction == "mean" else None
        # Each row's share of a backward of 1; "none" learns its rows' upstream gradients in backward
        scale = row_upstream(torch.ones((), dtype=acc_dtype), reduction, denominator, valid, target_ok)
        wants_grad = reduction != "none" and any(ctx.needs_input_grad[:3])
        grads = _empty_grads(hidden, lm_weight, bias, chunk_rows) if wants_grad else None
        row_loss = _chunk_pass(
            hidden, lm_weight, bias, index, weight, scale, smoothing, sparse, chunk_rows, grads
        )
        loss = reduce_rows(row_loss, valid, target_ok, reduction, valid.shape, denominator)
        ctx.reduction, ctx.smoothing, ctx.sparse, ctx.chunk_rows = reduction, smoothing, sparse, chunk_rows
        if reduction == "none":
            ctx.save_for_backward(hidden, lm_weight, bias, index, valid, target_ok, weight)
        else:
            d_hidden, d_weight, d_bias = grads if grads is not None else (None, None, None)
            ctx.save_for_backward(d_hidden, d_weight, d_bias)
            ctx.dtypes = (lm_weight.dtype, None if bias is None else bias.dtype)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_label_smoothing has no double backward: its gradient is a closed form")
        if ctx.reduction == "none":  # recompute the chunks with each row's upstream gradient as its share
            hidden, lm_weight, bias, index, valid, target_ok, weight = ctx.saved_tensors
            upstream = grad_output.to(compute_dtype(hidden.dtype))
            scale = row_upstream(upstream, "none", None, valid, target_ok)
            grads = _empty_grads(hidden, lm_weight, bias, ctx.chunk_rows)
            _chunk_pass(
                hidden,
                lm_weight,
                bias,
                index,
                weight,
                scale,
                ctx.smoothing,
                ctx.sparse,
                ctx.chunk_rows,
                grads,
            )
            d_hidden, d_weight, d_bias = grads
            weight_dtype, bias_dtype = lm_weight.dtype, None if bias is None else bias.dtype
        else:
            d_hidden, d_weight, d_bias = ctx.saved_tensors
            # On CPU reading the upstream gradient costs nothing: where it is 1 (loss.backward()),
            # skip three passes over the gradients; never in place (a second backward reuses them)
            if grad_output.device.type != "cpu" or grad_output.item() != 1:
                upstream = grad_output.to(compute_dtype(d_weight.dtype))
                d_hidden = d_hidden * upstream.to(d_hidden.dtype)
                d_weight = d_weight * upstream.to(d_weight.dtype)
                d_bias = None if d_bias is None else d_bias * upstream
            weight_dtype, bias_dtype = ctx.dtypes
        d_weight = d_weight.to(weight_dtype)
        d_bias = None if d_bias is None else d_bias.to(bias_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def linear_label_smoothing(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    *,
    bias: torch.Tensor | None = None,
    sparse: bool = False,
    reduction: str = "mean",
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy of `hidden @ lm_weight^T + bias` without holding the logits.

    hidden: (N, H) or (B, T, H); lm_weight: (V, H); target: (N,) or (B, T) class indices, or
    `ignore_index`; weight: (V,) class weights as in `F.cross_entropy` (exact smoothing only).
    `sparse=True`: SparseLSR (equation 15) instead of exact smoothing. chunk_rows: rows per chunk
    (default: `default_chunk_rows(V, N)`: an eighth of the rows, 256 to 256 MB of float32 logits).

    Example:
        >>> h, w = torch.randn(6, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
        >>> y = torch.randint(0, 50, (6,))
        >>> loss = linear_label_smoothing(h, w, y, 0.1, chunk_rows=4)
        >>> ref = torch.nn.functional.cross_entropy(h @ w.t(), y, label_smoothing=0.1)
        >>> torch.allclose(loss, ref, atol=1e-5)
        True
    """
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    if not (torch.is_tensor(hidden) and hidden.dtype.is_floating_point and hidden.dim() in (2, 3)):
        raise ValueError(
            f"hidden must be a floating (N, H) or (B, T, H) tensor, got {getattr(hidden, 'shape', hidden)}"
        )
    if lm_weight.dim() != 2 or lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_weight must be (V, H) with H = hidden's last size {hidden.shape[-1]}, got {tuple(lm_weight.shape)}"
        )
    if lm_weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden, lm_weight and bias must share a dtype, got {hidden.dtype} and {lm_weight.dtype}"
        )
    num_classes = lm_weight.shape[0]
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"bias must be (V,) = ({num_classes},), got {tuple(bias.shape)}")
    if target.dtype not in (torch.int64, torch.int32) or tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must hold integer classes of shape {tuple(hidden.shape[:-1])}, got {target.dtype} "
            f"{tuple(target.shape)}"
        )
    if sparse and num_classes < 2:
        raise ValueError("SparseLSR needs at least 2 classes")
    if sparse and weight is not None:
        raise ValueError("SparseLSR has no class-weighted form")
    check_weight(weight, num_classes, hidden.device)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if hidden.device.type == "cpu":  # reading the answer back costs nothing here
        check_targets(target, num_classes, ignore_index)
    out_shape = target.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat = target.reshape(-1).long()
    valid = flat != ignore_index
    if weight is not None:
        weight = weight.to(compute_dtype(hidden.dtype)).contiguous()
    loss = LinearLabelSmoothingFunction.apply(
        hidden2d,
        lm_weight.contiguous(),
        bias,
        flat,
        valid,
        weight,
        smoothing,
        bool(sparse),
        reduction,
        chunk_rows or default_chunk_rows(num_classes, hidden2d.shape[0]),
    )
    return loss.reshape(out_shape) if reduction == "none" else loss


class LinearLSRLoss(LabelSmoothingLoss):
    """`linear_label_smoothing` as a module: `loss_fn(hidden, lm_weight, target, bias=None)`.

    Example:
        >>> head = torch.nn.Linear(8, 50, bias=False)
        >>> loss_fn = LinearLSRLoss(smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 8), head.weight, torch.randint(0, 50, (4,)))
        >>> loss.backward()
    """

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        weight: torch.Tensor | None = None,
        sparse: bool = False,
        chunk_rows: int | None = None,
    ):
        super().__init__(smoothing, reduction, ignore_index, weight)
        self.sparse, self.chunk_rows = sparse, chunk_rows

    def forward(
        self,
        hidden: torch.Tensor,
        lm_weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_label_smoothing(
            hidden,
            lm_weight,
            target,
            self.smoothing,
            bias=bias,
            sparse=self.sparse,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            weight=self.weight,
            chunk_rows=self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse}, chunk_rows={self.chunk_rows}"
