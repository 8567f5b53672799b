"""Vocab-parallel label smoothing: the classes of each row split across the ranks of a process group.

Each rank r holds a consecutive slice of C_r classes starting at class o_r, in rank order (slices may
differ in size; a rank may hold none), C = sum_r C_r, and the same global targets. The loss is that of
the unsharded logits: exact label smoothing over all C classes (PyTorch's `label_smoothing`), or
SparseLSR's equation 15 with the full C. The math of both is in `lsr.fused.algebra`; what sharding adds:

Each rank runs the fused losses' statistics pass (`lsr.fused.passes.row_stats`: Triton on CUDA,
compiled on CPU) over its slice, with the target moved into the slice, and keeps per row:
  lse_r = logsumexp of its logits; z_y where it owns the target, 0 elsewhere; and
  - exact:  dot_r = sum over its classes of w_j z_j (w all 1 without weights);
  - sparse: f_r = its non-target exp sum over its exp sum (1 - p_y of the slice where it owns the
    target, 1 where it does not).
The whole rows follow from these O(N) numbers:
  lse = logsumexp_r lse_r,   z_y = sum_r z_y,r,   dot = sum_r dot_r,
  1 - p_y = sum_r f_r exp(lse_r - lse),
a sum of non-negative terms that keeps 1 - p_y's digits as the single-device pass does (forming it
as 1 - exp(z_y - lse) would not). The per-row algebra and the backward pass are then the fused
losses' own (`exact_rows`, `sparse_rows`, `passes.gradient`): the gradient alpha p_k - gamma w_k, and tau
on the target column, needs only the global lse, alpha and tau of each row, so backward is local.

One collective per forward pass: an all_gather of each rank's packed (N + 1, 3) float64 table (the
three columns above, plus a row holding the slice's size and offset: 98 KB at N = 4096). The
alternative, an all_reduce MAX of the row maxima, then an all_reduce SUM of the sums rescaled to it,
moves a volume that does not grow with the number of ranks P (the gather's does), but takes two
round trips, the second waiting on the first. The tables are O(N), small beside the N x C / P
logits, so one round trip wins at the sizes tensor parallelism uses (P up to a few dozen); the sizes
ride along, giving C and checking the offsets for free. The offset cannot ride too: it decides which
targets the slice owns, which its pass needs (z_y, and SparseLSR's non-target sum). So without
`class_offset` one more, tiny, all_gather of the slice sizes comes first. The backward pass has none.

Before any of these, where `check_ranks` (default: on CPU, where it costs no host synchronisation
the caller did not ask for), the ranks check that they agree: one all_gather of a fixed-size
fingerprint of each rank's arguments (`lsr.parallel_checks`), so that ranks that disagree, or an
argument only one rank rejects, raise the same error on every rank instead of a wrong loss, a hang or
an abort. The fingerprint carries the slices' sizes, so the sizes' all_gather is then not needed.

Megatron-LM's vocab-parallel cross-entropy (issue 737) smoothed over the local slice: its smoothing
term used the shard's size and the shard's sum of log-probabilities. Here C and dot are global, so the
result equals `F.cross_entropy(full_logits, target, label_smoothing=eps)` (tests/test_parallel.py).

Launched with torchrun, on every rank:

    import torch, torch.distributed as dist
    from lsr.parallel import vocab_parallel_label_smoothing

    dist.init_process_group("gloo")  # "nccl" on GPUs
    shard = hidden @ output_weight_slice.T  # (N, C_r): this rank's classes
    loss = vocab_parallel_label_smoothing(shard, target, smoothing=0.1)
    loss.backward()  # shard.grad: this rank's slice of the full gradient
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from lsr._common import (
    LabelSmoothingLoss,
    as_rows,
    check_reduction,
    check_smoothing,
    check_targets,
    check_weight,
    compute_dtype,
)
from lsr.fused import passes
from lsr.fused.algebra import reduce_from_stats, row_upstream
from lsr.fused.autograd import NO_DOUBLE_BACKWARD
from lsr.parallel_checks import RankArguments, agree_across_ranks, check_slices, gather_from_ranks

# --- the collectives ----------------------------------------------------------------------------------


def _slice_sizes(num_local_classes: int, device: torch.device, group) -> list[int]:
    return (
        gather_from_ranks(torch.tensor([num_local_classes], dtype=torch.int64, device=device), group)
        .view(-1)
        .tolist()
    )


# --- local pass and combination, O(N) -------------------------------------------------------------------


def _local_table(shard, owned, local_index, weight, acc_dtype, sparse):
    """(M, 3) float64: lse_r, z_y where owned (else 0), and dot_r (exact) or f_r (sparse)."""
    n_rows = shard.shape[0]
    if shard.shape[1] == 0:  # no classes here: exp sums of 0, nothing owned
        third = torch.ones if sparse else torch.zeros
        return torch.stack(
            [
                torch.full((n_rows,), float("-inf"), dtype=torch.float64, device=shard.device),
                torch.zeros(n_rows, dtype=torch.float64, device=shard.device),
                third(n_rows, dtype=torch.float64, device=shard.device),
            ],
            dim=1,
        )
    lse, z_y, dot, one_minus_p_y = passes.row_stats(shard, local_index, weight, acc_dtype, sparse)
    third = torch.where(owned, one_minus_p_y, 1.0) if sparse else dot
    return torch.stack([lse, torch.where(owned, z_y, 0.0), third], dim=1).double()


def _combine(tables: torch.Tensor, sparse: bool):
    """(P, M, 3) tables of all ranks -> the whole rows' lse, z_y and dot (exact) or 1 - p_y (sparse)."""
    lse_r, z_y_r, third_r = tables.unbind(dim=2)
    lse = torch.logsumexp(lse_r, dim=0)
    third = (third_r * torch.exp(lse_r - lse)).sum(dim=0) if sparse else third_r.sum(dim=0)
    return lse, z_y_r.sum(dim=0), third


# --- autograd ---------------------------------------------------------------------------------------------


class VocabParallelLabelSmoothingFunction(torch.autograd.Function):
    """(M, C_r) contiguous slice of the logits -> the reduced loss of the whole rows (the same on every
    rank); saves lse, alpha and tau per row (O(N)). Backward gives this rank's slice of the gradient."""

    @staticmethod
    def forward(
        ctx,
        shard,
        target,  # (M,) int64, global classes, ignored rows replaced by 0
        valid,
        raw_target,  # (M,) the caller's targets, for validation
        weight,  # (C,) all classes' weights, or None
        smoothing,
        sparse,
        reduction,
        ignore_index,
        out_shape,
        class_offset,
        group,
        validate,
    ):
        acc_dtype = compute_dtype(shard.dtype)
        n_rows, n_local = shard.shape
        rank = dist.get_rank(group)
        if class_offset is None:
            sizes = _slice_sizes(n_local, shard.device, group)
            class_offset = sum(sizes[:rank])
            check_weight(weight, sum(sizes), shard.device)
        elif weight is not None and weight.shape[0] < class_offset + n_local:  # C is not known yet
            raise ValueError(
                f"weight has {weight.shape[0]} entries, but this rank's classes end at {class_offset + n_local}: "
                "weight must hold one weight per class of the whole vocabulary"
            )
        local_weight = None if weight is None else weight[class_offset : class_offset + n_local]
        owned = (target >= class_offset) & (target < class_offset + n_local)
        local_index = torch.where(owned, target - class_offset, 0)

        table = _local_table(shard, owned, local_index, local_weight, acc_dtype, sparse)
        header = table.new_tensor([[n_local, class_offset, 0.0]])  # one more row: the slice
        tables = gather_from_ranks(torch.cat([table, header]), group)
        sizes, offsets = (tables[:, n_rows, i].long().tolist() for i in range(2))
        num_classes = sum(sizes)

        # Every rank sees the same tables and targets, so these raise on all ranks together
        check_slices(sizes, offsets)
        if num_classes < (2 if sparse else 1):
            raise ValueError(f"this loss needs at least {2 if sparse else 1} classes, got C={num_classes}")
        check_weight(weight, num_classes, shard.device)
        if validate:
            check_targets(raw_target, num_classes, ignore_index)

        lse, z_y, third = (t.to(acc_dtype) for t in _combine(tables[:, :n_rows], sparse))
        # From here as FusedLabelSmoothingFunction: the same algebra on the gathered statistics
        loss, alpha, gamma, tau, denominator, target_ok = reduce_from_stats(
            lse, z_y, third, target, valid, weight, smoothing, num_classes, sparse, reduction, out_shape
        )

        alpha = alpha if torch.is_tensor(alpha) else torch.full_like(lse, alpha)
        ctx.save_for_backward(
            shard, local_index, owned, valid, target_ok, local_weight, lse, alpha, tau, denominator
        )
        ctx.gamma, ctx.reduction = gamma, reduction
        return loss.to(shard.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        shard, local_index, owned, valid, target_ok, weight, lse, alpha, tau, denominator = ctx.saved_tensors
        s = row_upstream(grad_output.to(lse.dtype), ctx.reduction, denominator, valid, target_ok)
        if shard.shape[1] == 0:
            return torch.zeros_like(shard), *(None,) * 12
        p, r, t = s * alpha, s * ctx.gamma, s * tau
        # `passes.gradient` writes t at local_index in every row. Where the target is another rank's, that
        # index is 0: give it class 0's own off-target value, which the pass would have written there.
        w_0 = 1.0 if weight is None else weight[0]
        t_elsewhere = p * torch.exp(shard[:, 0].to(lse.dtype) - lse) - r * w_0
        grad = passes.gradient(
            shard, local_index, weight, lse, p, r, torch.where(owned, t, t_elsewhere), False
        )
        return grad, *(None,) * 12


# --- functional API ---------------------------------------------------------------------------------------


def vocab_parallel_label_smoothing(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    smoothing: float = 0.0,
    *,
    group: dist.ProcessGroup | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    sparse: bool = False,
    class_offset: int | None = None,
    weight: torch.Tensor | None = None,
    validate_targets: bool | None = None,
    check_ranks: bool | None = None,
) -> torch.Tensor:
    """Label smoothing over logits whose classes are split across the ranks of `group`; call it on
    every rank. Exact (`F.cross_entropy(full_logits, target, label_smoothing=smoothing)`) or SparseLSR
    (`sparse=True`, equation 15 with the full C), as `lsr.fused`, O(N) memory beside the logits.

    Args:
        logits_shard: this rank's consecutive slice of the classes, (C_r), (N, C_r) or
            (N, C_r, d1, ..., dk), C_r >= 0, in rank order (rank 0 the first classes); slices may differ
            in size. float16/bfloat16 are computed in float32, gradient in the input's dtype.
        target: global class indices in [0, C), the same on every rank; (), (N) or (N, d1, ..., dk).
        smoothing: eps (xi for SparseLSR) in [0, 1].
        group: the process group holding the slices (default: the world).
        reduction: "mean" (over non-ignored elements, weighted by their targets' weights), "sum" or
            "none"; the same value on every rank.
        ignore_index: target value of elements that contribute 0 and leave the mean's denominator.
        sparse: SparseLSR (equation 15) instead of exact label smoothing.
        class_offset: the global index of this rank's first class. Given on every rank, it saves one
            (tiny) collective where the ranks are not checked; it is checked against the slices'
            sizes either way.
        weight: (C,) class weights of the whole vocabulary, the same on every rank, like target
            (exact smoothing only; they receive no gradient).
        validate_targets: check targets are in [0, C); default: on CPU only.
        check_ranks: before the loss's own collectives, check that the ranks agree
            (`lsr.parallel_checks`: one all_gather of a fixed-size fingerprint, read on the host);
            default: on CPU only. The same value on every rank.

    Bad input raises on every rank together: with `check_ranks`, also input that only some ranks
    see (an argument one rank rejects, targets out of range on one rank) and ranks that disagree
    (targets, smoothing, reduction, sparse, ignore_index, weights, N, dtype, class_offset given on
    some ranks only), with a ValueError naming what differs and where. Without it, only bad input
    every rank sees (the rest may hang, abort or give a wrong loss). One collective forward (two
    without class_offset, or with check_ranks), none backward; each reads a few numbers back on
    the host (the slices' sizes). Differentiable once, as `lsr.fused`.
    """
    args, error = None, None
    try:  # the local checks: with check_ranks, every rank learns whether they passed everywhere
        args = _checked_arguments(
            logits_shard, target, smoothing, reduction, ignore_index, sparse, class_offset, weight
        )
        args = dataclasses.replace(args, validate=_on_cpu_unless(validate_targets, args.rows.target.device))
    except Exception as caught:  # noqa: BLE001 - raised below, on every rank where they are checked
        error = caught
    if not dist.is_available() or not dist.is_initialized():
        if error is not None:
            raise error
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(torchrun sets up its environment)"
        )
    device = args.rows.logits.device if args is not None else _fallback_device(logits_shard, target, group)
    checked = _on_cpu_unless(check_ranks, device)
    if checked:  # raises on every rank together, before any collective that depends on shapes
        sizes = agree_across_ranks(args, error, group, device)
        class_offset = sum(sizes[: dist.get_rank(group)])
    elif error is not None:
        raise error
    rows = args.rows
    return VocabParallelLabelSmoothingFunction.apply(
        rows.logits.contiguous(),
        rows.safe_target,
        rows.valid,
        rows.target,
        args.weight,
        args.smoothing,
        args.sparse,
        args.reduction,
        ignore_index,
        rows.out_shape,
        class_offset,
        group,
        args.validate and not checked,  # checked ranks have validated their targets already
    )


def _on_cpu_unless(option: bool | None, device: torch.device) -> bool:
    return device.type == "cpu" if option is None else bool(option)


def _fallback_device(logits_shard, target, group) -> torch.device:
    """Where a rank whose arguments were rejected puts its fingerprint: its tensors' device, else the
    backend's (NCCL's is the current GPU)."""
    for tensor in (logits_shard, target):
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checked_arguments(
    logits_shard, target, smoothing, reduction, ignore_index, sparse, class_offset, weight
):
    """The checks that need no other rank; raises on this rank alone."""
    smoothing, reduction = check_smoothing(smoothing), check_reduction(reduction)
    if sparse and weight is not None:
        raise ValueError("SparseLSR has no class-weighted form: weight must be None with sparse=True")
    if class_offset is not None and (isinstance(class_offset, bool) or not isinstance(class_offset, int)):
        raise TypeError(f"class_offset must be an int, got {type(class_offset).__name__}")
    if class_offset is not None and class_offset < 0:
        raise ValueError(f"class_offset must be >= 0, got {class_offset}")
    if isinstance(logits_shard, torch.Tensor) and logits_shard.dim() > 2 and logits_shard.shape[1] == 0:
        # No classes here, (N, 0, d1, ...): as_rows's reshape(-1, 0) cannot count the rows, so it
        # checks a one-class stand-in, and the rows are laid out here
        stand_in = logits_shard.new_empty(logits_shard.shape[:1] + (1,) + logits_shard.shape[2:])
        rows = as_rows(stand_in, target, ignore_index, validate_targets=False)
        rows = dataclasses.replace(rows, logits=logits_shard.movedim(1, -1).reshape(rows.target.shape[0], 0))
    else:  # min_classes=0: a rank may hold no classes; C is checked once every slice is known
        rows = as_rows(logits_shard, target, ignore_index, min_classes=0, validate_targets=False)
    if weight is not None:
        if isinstance(weight, torch.Tensor) and weight.dim() != 1:
            raise ValueError(f"weight must have shape (C,), one per class, got {tuple(weight.shape)}")
        check_weight(weight, len(weight), rows.logits.device)  # type and device; C is checked inside
        if weight.requires_grad:
            raise ValueError("weight must not require grad: the fused losses give no gradient for it")
        weight = weight.to(compute_dtype(rows.logits.dtype)).contiguous()
    return RankArguments(rows, weight, smoothing, reduction, bool(sparse), ignore_index, class_offset, False)


# --- module -------------------------------------------------------------------------------------------------


class VocabParallelLSRLoss(LabelSmoothingLoss):
    """`vocab_parallel_label_smoothing` as a module: `loss_fn(logits_shard, target)`, on every rank.

    Args: as `vocab_parallel_label_smoothing`; `weight` (the whole vocabulary's) is a buffer.

    Example, on each rank of a torchrun launch, after `init_process_group`:

        loss_fn = VocabParallelLSRLoss(smoothing=0.1)
        loss_fn(shard, target).backward()
    """

    def __init__(
        self,
        smoothing: float = 0.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        *,
        sparse: bool = False,
        group: dist.ProcessGroup | None = None,
        class_offset: int | None = None,
        weight: torch.Tensor | None = None,
        validate_targets: bool | None = None,
        check_ranks: bool | None = None,
    ):
        super().__init__(smoothing, reduction, ignore_index, weight)
        self.sparse, self.group, self.class_offset = sparse, group, class_offset
        self.validate_targets, self.check_ranks = validate_targets, check_ranks

    def forward(self, logits_shard: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_label_smoothing(
            logits_shard,
            target,
            self.smoothing,
            group=self.group,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            sparse=self.sparse,
            class_offset=self.class_offset,
            weight=self.weight,
            validate_targets=self.validate_targets,
            check_ranks=self.check_ranks,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse}, class_offset={self.class_offset}"
