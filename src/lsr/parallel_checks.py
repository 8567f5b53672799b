"""The ranks of a vocab-parallel loss agree before they combine: one small collective, `agree_across_ranks`.

`lsr.parallel.vocab_parallel_label_smoothing` combines per-rank statistics, so it needs every rank to
pass the same targets, smoothing, reduction, sparse, ignore_index and weights, and the same kind of
slice. Where they differ, the loss's own collectives either combine what does not belong together
(a wrong loss, or a different loss on each rank, silently) or do not match at all: tables of
different N (gloo aborts the process), `class_offset` on one rank only (one rank makes a collective
the others never make), an argument that one rank rejects before any collective (the others wait).

So each rank first packs a fixed-size int64 fingerprint of what it was given and all ranks
all_gather it: whether its own argument checks passed (and if not, the start of its error message),
N and the target's shape, the logits' dtype, smoothing (its float64 bits), the reduction, sparse,
ignore_index, its class_offset (or that none was given), its slice's size, whether it validates
targets, the weights' length (or that there are none) and a checksum of their values, a checksum of
the targets and their smallest and largest class (ignored elements count as class 0). Every rank
then reads the same table and makes the same decision, so a disagreement raises the same ValueError
on every rank, naming what differs and which ranks hold which value; never a hang or an abort.

The checksums are sums, wrapping modulo 2^64, of a position-dependent 64-bit mix of each value:
integer arithmetic, so the same on every rank whatever the number of threads or the order of the
sum; two different target tensors of one shape have the same checksum with probability about 2^-64.
The slices' sizes ride along, so the loss needs no other collective for them.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import torch
import torch.distributed as dist

from lsr._common import Rows, check_targets, check_weight
from lsr.types import REDUCTIONS

MESSAGE_SLOTS = 32  # 256 bytes of a rejected argument's error message travel to the other ranks
SHAPE_SLOTS = 6  # the target's first dimensions, one slot each; longer shapes also carry a hash
# Name and number of int64 slots of each field of the fingerprint, in order
FIELDS = (
    ("ok", 1),
    ("message", MESSAGE_SLOTS),
    ("N", 1),
    ("target shape", 2 + SHAPE_SLOTS),  # ndim, the dims, a hash of the whole shape
    ("dtype", 1),
    ("smoothing", 1),
    ("reduction", 1),
    ("sparse", 1),
    ("ignore_index", 1),
    ("class_offset", 1),  # -1 where none was given
    ("slice size", 1),
    ("validate", 1),
    ("weight", 1),  # its length, -1 for none
    ("weight values", 1),
    ("targets", 1),
    ("target range", 2),
)
_K1, _K2, _K3 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # odd 64-bit constants


@dataclasses.dataclass(frozen=True)
class RankArguments:
    """One rank's arguments, once its own checks have passed."""

    rows: Rows
    weight: torch.Tensor | None  # the compute dtype's, contiguous
    smoothing: float
    reduction: str
    sparse: bool
    ignore_index: int
    class_offset: int | None
    validate: bool


# --- collectives ------------------------------------------------------------------------------------------


def gather_from_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """(P, *tensor.shape): every rank's `tensor`, in rank order."""
    world = dist.get_world_size(group)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, *tensor.shape)


def check_slices(sizes: list[int], offsets: list[int]) -> None:
    """Every rank's offset is the number of classes held by the ranks before it."""
    start = 0
    for rank, (size, offset) in enumerate(zip(sizes, offsets, strict=True)):
        if offset != start:
            raise ValueError(
                f"rank {rank} was given class_offset={offset}, but the ranks before it hold {start} classes "
                f"(slice sizes {sizes}): each rank must hold the classes that follow the previous rank's"
            )
        start += size


# --- the fingerprint ----------------------------------------------------------------------------------------


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit mixing function on int64 (multiplications wrap; shifts are logical)."""
    x = x * _K1
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * _K2
    return x ^ ((x >> 29) & ((1 << 35) - 1))


def checksum(values: torch.Tensor) -> torch.Tensor:
    """0-dim int64: sum over i of mix(values[i] + mix(i)), modulo 2^64; values int64, flattened."""
    values = values.reshape(-1)
    index = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    return _mix(values + _mix(index + _K3)).sum()


def _text_slots(text: str) -> list[int]:
    data = text.encode("utf-8")[: 8 * MESSAGE_SLOTS].ljust(8 * MESSAGE_SLOTS, b"\0")
    return list(struct.unpack(f"<{MESSAGE_SLOTS}q", data))


def _slots_text(slots: list[int]) -> str:
    return struct.pack(f"<{MESSAGE_SLOTS}q", *slots).rstrip(b"\0").decode("utf-8", "replace")


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _code(text: str) -> int:
    return zlib.crc32(text.encode())


def _int_or_code(value) -> int:
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return int(value)
    return _code(repr(value))


_DTYPE_NAMES = {_code(str(d)): str(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _fingerprint(args: RankArguments | None, error: BaseException | None, device) -> torch.Tensor:
    width = sum(slots for _, slots in FIELDS)
    if args is None:  # this rank's own checks failed: ok = 0, the start of its message, zeros
        head = [0, *_text_slots(f"{type(error).__name__}: {error}")]
        return torch.tensor(head + [0] * (width - len(head)), dtype=torch.int64, device=device)
    rows, shape = args.rows, tuple(args.rows.out_shape)
    dims = list(shape[:SHAPE_SLOTS]) + [-1] * (SHAPE_SLOTS - min(len(shape), SHAPE_SLOTS))
    host = [
        1,
        *[0] * MESSAGE_SLOTS,
        shape[0] if shape else -1,
        len(shape),
        *dims,
        _code(repr(shape)),
        _code(str(rows.logits.dtype)),
        _float_bits(args.smoothing),
        REDUCTIONS.index(args.reduction),
        int(args.sparse),
        _int_or_code(args.ignore_index),
        -1 if args.class_offset is None else _int_or_code(args.class_offset),
        rows.logits.shape[1],
        int(args.validate),
        -1 if args.weight is None else args.weight.shape[0],
    ]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    weight_sum = zero if args.weight is None else checksum(args.weight.double().view(torch.int64))
    low_high = rows.safe_target.aminmax() if rows.safe_target.numel() else (zero, zero)
    on_device = torch.stack([weight_sum, checksum(rows.target), *low_high])
    return torch.cat([torch.tensor(host, dtype=torch.int64, device=device), on_device])


def _columns(table: list[list[int]]) -> dict[str, list]:
    """{field: every rank's value}: one int per rank, or a list where the field has several slots."""
    out, start = {}, 0
    for name, slots in FIELDS:
        cells = [row[start : start + slots] for row in table]
        out[name] = [c[0] for c in cells] if slots == 1 else cells
        start += slots
    return out


# --- the decision, the same on every rank --------------------------------------------------------------------


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _disagreement(what: str, keys: list, shown: list[str], note: str = "") -> ValueError | None:
    """None where every rank has the same key, else "ranks disagree on what: rank 0 has ..."."""
    groups: dict = {}
    for rank, key in enumerate(keys):
        groups.setdefault(key, []).append(rank)
    if len(groups) == 1:
        return None
    parts = [f"{_ranks(r)} {'has' if len(r) == 1 else 'have'} {shown[r[0]]}" for r in groups.values()]
    return ValueError(f"vocab-parallel ranks disagree on {what}: {', '.join(parts)}{note}")


def _shape_text(cells: list[int]) -> str:
    ndim, dims = cells[0], cells[1 : 1 + min(cells[0], SHAPE_SLOTS)]
    return str(tuple(dims)) if ndim <= SHAPE_SLOTS else f"({', '.join(map(str, dims))}, ...) ({ndim} dims)"


def _first_disagreement(col: dict[str, list]) -> ValueError | None:
    """The first field the ranks disagree on, in the order a caller would look for it."""
    same = " (it must be the same on every rank)"
    checks = [
        ("N, the targets' first dimension", col["N"], [str(n) if n >= 0 else "() (unbatched)" for n in col["N"]]),
        ("the target shape", [tuple(c) for c in col["target shape"]], list(map(_shape_text, col["target shape"]))),
        ("the logits' dtype", col["dtype"], [_DTYPE_NAMES.get(c, f"dtype #{c}") for c in col["dtype"]]),
        ("smoothing", col["smoothing"], [str(struct.unpack("<d", struct.pack("<q", b))[0]) for b in col["smoothing"]]),
        ("reduction", col["reduction"], [repr(REDUCTIONS[i]) for i in col["reduction"]]),
        ("sparse", col["sparse"], [str(bool(s)) for s in col["sparse"]]),
        ("ignore_index", col["ignore_index"], list(map(str, col["ignore_index"]))),
        (
            "whether class_offset is given (give it on every rank or on none)",
            [o >= 0 for o in col["class_offset"]],
            [f"class_offset={o}" if o >= 0 else "None" for o in col["class_offset"]],
        ),
        ("weight", col["weight"], [f"a ({n},) tensor" if n >= 0 else "None" for n in col["weight"]]),
    ]  # fmt: skip
    for what, keys, shown in checks:
        if error := _disagreement(what, keys, shown, "" if what.startswith("whether") else same):
            return error
    return None


def _raise_rejected(col: dict[str, list], rank: int, error: BaseException | None) -> None:
    failed = [r for r, ok in enumerate(col["ok"]) if not ok]
    if not failed:
        return
    if error is not None:  # this rank's own error, as it would have raised alone
        raise error
    raise ValueError(
        f"vocab-parallel {_ranks(failed)} rejected {'its' if len(failed) == 1 else 'their'} arguments, so "
        f"every rank raises (this rank's were valid); rank {failed[0]}: {_slots_text(col['message'][failed[0]])}"
    )


def _check_targets_in_range(col, args: RankArguments, rank: int, num_classes: int) -> None:
    """Where any rank validates targets: every rank raises if some rank's are out of range."""
    if not any(col["validate"]):
        return
    bad = [r for r, (low, high) in enumerate(col["target range"]) if low < 0 or high >= num_classes]
    if not bad:
        return
    if rank in bad:  # the message of the single-device losses, with the first bad value
        check_targets(args.rows.target, num_classes, args.ignore_index)
    low, high = col["target range"][bad[0]]
    raise ValueError(
        f"vocab-parallel rank {bad[0]} has target value {low if low < 0 else high}, out of range for "
        f"C={num_classes} classes: targets must be in [0, {num_classes}) or equal ignore_index, on every rank"
    )


def agree_across_ranks(
    args: RankArguments | None, error: BaseException | None, group, device: torch.device
) -> list[int]:
    """Every rank's slice size, once every rank of `group` has checked that they all agree: one
    all_gather of a fixed-size fingerprint. `args` is None where this rank's own checks raised `error`.
    Raises on every rank together: this rank's `error`, or a ValueError naming the rank that failed,
    the field the ranks disagree on, a slice layout that does not line up, too few classes, weights
    of the wrong length, or (where any rank validates targets) a rank's target out of range."""
    try:
        fingerprint = _fingerprint(args, error, device)
    except Exception as caught:  # noqa: BLE001 - this rank takes part all the same, and raises with the rest
        args, error = None, caught
        fingerprint = _fingerprint(None, caught, device)
    table = gather_from_ranks(fingerprint.unsqueeze(0), group)
    col = _columns(table.view(table.shape[0], -1).tolist())  # the one read on the host
    rank = dist.get_rank(group)
    _raise_rejected(col, rank, error)
    if disagreement := _first_disagreement(col):
        raise disagreement
    sizes = col["slice size"]
    num_classes = sum(sizes)
    if args.class_offset is not None:
        check_slices(sizes, col["class_offset"])
    if num_classes < (2 if args.sparse else 1):
        raise ValueError(f"this loss needs at least {2 if args.sparse else 1} classes, got C={num_classes}")
    check_weight(args.weight, num_classes, args.rows.logits.device)
    _check_targets_in_range(col, args, rank, num_classes)
    same = " (it must be the same on every rank)"
    for what, name in (("the targets", "targets"), ("the weight values", "weight values")):
        shown = [f"checksum {c & (2**64 - 1):016x}" for c in col[name]]
        if disagreement := _disagreement(what, col[name], shown, same):
            raise disagreement
    return sizes
