"""Vocab-parallel label smoothing (lsr.parallel) over gloo, in spawned processes.

Three processes are spawned once (imports dominate the file's time); each runs every check below
over the world of 3 ranks, then ranks 0 and 1 over a group of their own (uneven slices, and in a
second layout a rank that holds none), and reports each check's failures (with tracebacks) to the
parent, whose tests assert on them. Within a check, comparisons collect their failures instead of
raising at once, so that the ranks stay in step through the collectives.
"""

import datetime
import functools
import importlib.util
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lsr.parallel
from helpers import REDUCTIONS, TOLERANCE, loss_and_grad, random_problem
from lsr.fused import cpu_options
from lsr.parallel import VocabParallelLSRLoss, vocab_parallel_label_smoothing
from lsr.reference import exact_reference, sparse_reference

# Classes held by each rank, in rank order: uneven, and (second layout) a rank that holds none.
LAYOUTS = {2: [[3, 7], [0, 10]], 3: [[2, 5, 3], [4, 0, 6]]}
IGNORE = -100
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _offsets(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


class Failures(list):
    """Collects failed comparisons, so that every rank runs every collective of a check."""

    def check(self, label, compare, *args, **kwargs):
        try:
            compare(*args, **kwargs)
        except AssertionError as error:
            self.append(f"{label}: {error}")

    def raises(self, label, error, match, fn):
        try:
            fn()
        except error as raised:
            if match not in str(raised):
                self.append(f"{label}: raised {raised!r}, expected a message with {match!r}")
        except Exception as raised:  # noqa: BLE001 - the wrong kind of error is a failure here
            self.append(f"{label}: raised {raised!r}, expected {error.__name__}")
        else:
            self.append(f"{label}: did not raise {error.__name__}")

    def done(self):
        if self:
            raise AssertionError("\n".join(self))


def _shard(full, rank, sizes):
    start = _offsets(sizes)[rank]
    return full.narrow(1 if full.dim() > 1 else 0, start, sizes[rank])


# --- the checks, run on every rank ---------------------------------------------------------------------


def check_reference(rank, world, group):
    """Loss and gradient equal the float64 definitions on the unsharded logits: every reduction,
    ignore_index, exact (with and without class weights) and sparse, every dtype (float32 only where a
    rank holds no classes), (N, C, d) inputs, offsets given and derived."""
    vocab_parallel = functools.partial(vocab_parallel_label_smoothing, group=group)
    failures, case = Failures(), 0
    for sizes, dtypes in zip(LAYOUTS[world], (DTYPES, (torch.float32,)), strict=True):
        num_classes = sum(sizes)
        for sparse in (False, True):
            for reduction in REDUCTIONS:
                for dtype in dtypes:
                    case += 1
                    shape = (5, num_classes, 2) if case % 3 == 0 else (7, num_classes)
                    full, target = random_problem(
                        shape, scale=2.0, dtype=dtype, ignore_fraction=0.3, seed=case, ignore_index=IGNORE
                    )
                    weight = None
                    if not sparse and case % 2:
                        weight = torch.rand(num_classes, generator=torch.Generator().manual_seed(case)) + 0.5
                    eps = 0.1 + 0.05 * (case % 4)
                    options = {"reduction": reduction, "ignore_index": IGNORE}
                    offset = _offsets(sizes)[rank] if case % 2 else None

                    parallel = functools.partial(
                        vocab_parallel,
                        smoothing=eps,
                        sparse=sparse,
                        class_offset=offset,
                        weight=weight,
                    )
                    reference = functools.partial(
                        sparse_reference if sparse else exact_reference, smoothing=eps, weight=weight
                    )
                    loss, grad = loss_and_grad(parallel, _shard(full, rank, sizes), target, **options)
                    ref_loss, ref_grad = loss_and_grad(reference, full.double(), target, **options)
                    rtol, atol = TOLERANCE[dtype]
                    label = f"sizes={sizes} sparse={sparse} {reduction} {dtype} weighted={weight is not None}"
                    failures.check(
                        f"{label} loss",
                        torch.testing.assert_close,
                        loss.double(),
                        ref_loss,
                        rtol=rtol,
                        atol=atol,
                    )
                    failures.check(
                        f"{label} gradient",
                        torch.testing.assert_close,
                        grad.double(),
                        _shard(ref_grad, rank, sizes),
                        rtol=rtol,
                        atol=atol,
                    )
                    failures.check(f"{label} dtype", _equal, (loss.dtype, grad.dtype), (dtype, dtype))

    # The module is the function; an unbatched (C) sample
    sizes = LAYOUTS[world][0]
    full, target = random_problem((sum(sizes),), scale=2.0, seed=99)
    module = VocabParallelLSRLoss(smoothing=0.2, sparse=True, group=group)
    failures.check(
        "module, unbatched",
        torch.testing.assert_close,
        module(_shard(full, rank, sizes), target).double(),
        sparse_reference(full.double(), target, 0.2),
    )
    # 1 - p_y keeps its digits near p_y = 1 (lsr.fused.algebra: 1.6811 instead of 1.5166 when formed
    # as -expm1(z_y - lse) in float32), each class on its own rank where there are 3
    full, target = torch.tensor([[20.0, 5.0, 4.0]]), torch.tensor([0])
    sizes = [1, 1, 1] if world == 3 else [1, 2]
    loss = vocab_parallel(_shard(full, rank, sizes), target, 0.15, sparse=True)
    failures.check(
        "sparse near p_y = 1",
        torch.testing.assert_close,
        loss.double(),
        sparse_reference(full.double(), target, 0.15),
        rtol=1e-5,
        atol=0.0,
    )
    # The path GPUs take: the Triton kernels (interpreted on CPU), where they are installed
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        sizes = LAYOUTS[world][1]
        full, target = random_problem(
            (6, sum(sizes)), scale=2.0, ignore_fraction=0.3, seed=3, ignore_index=IGNORE
        )
        weight = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(3)) + 0.5
        for sparse, w in ((False, weight), (True, None)):
            with cpu_options("triton"):
                loss, grad = loss_and_grad(
                    functools.partial(vocab_parallel, smoothing=0.1, sparse=sparse, weight=w),
                    _shard(full, rank, sizes),
                    target,
                )
            reference = functools.partial(
                sparse_reference if sparse else exact_reference, smoothing=0.1, weight=w
            )
            ref_loss, ref_grad = loss_and_grad(reference, full.double(), target)
            failures.check(
                f"triton sparse={sparse} loss", torch.testing.assert_close, loss.double(), ref_loss
            )
            failures.check(
                f"triton sparse={sparse} gradient",
                torch.testing.assert_close,
                grad.double(),
                _shard(ref_grad, rank, sizes),
            )
    failures.done()


def _equal(actual, expected):
    assert actual == expected, f"{actual} != {expected}"


def megatron_737_loss(full, target, eps, rank, sizes):
    """Megatron-LM's vocab-parallel smoothing before its fix (issue 737): the smoothing term averages
    log p over the LOCAL slice and rescales eps by the slice's size: a different loss on each rank."""
    log_p = torch.log_softmax(full.double(), dim=1)
    local_size = sizes[rank]
    smoothing = eps * local_size / (local_size - 1)
    ce = F.nll_loss(log_p, target, reduction="none")
    return ((1 - smoothing) * ce - smoothing * _shard(log_p, rank, sizes).mean(dim=1)).mean()


def check_megatron(rank, world, group):
    """Megatron-LM issue 737: over shards, loss and gradient equal F.cross_entropy's on the whole rows
    (which the slice-local smoothing that Megatron-LM had does not)."""
    vocab_parallel = functools.partial(vocab_parallel_label_smoothing, group=group)
    failures = Failures()
    sizes = LAYOUTS[world][0]
    eps = 0.1
    full, target = random_problem((16, sum(sizes)), scale=3.0, seed=737)
    shard = _shard(full, rank, sizes).clone().requires_grad_(True)
    loss = vocab_parallel(shard, target, eps)
    loss.backward()
    whole = full.clone().requires_grad_(True)
    expected = F.cross_entropy(whole, target, label_smoothing=eps)
    expected.backward()
    failures.check("loss", torch.testing.assert_close, loss, expected.detach())
    failures.check("gradient", torch.testing.assert_close, shard.grad, _shard(whole.grad, rank, sizes))
    # The test tells the two apart: the slice-local smoothing is off by far more than the tolerance
    local = megatron_737_loss(full, target, eps, rank, sizes).item()
    if abs(local - expected.item()) < 1e-3:
        failures.append(f"the slice-local loss {local} is indistinguishable from {expected.item()}")
    failures.done()


def check_bad_input(rank, world, group):
    """The single-device losses' errors, raised on every rank (all ranks see the same bad input)."""
    vocab_parallel = functools.partial(vocab_parallel_label_smoothing, group=group)
    failures = Failures()
    sizes = LAYOUTS[world][0]
    num_classes = sum(sizes)
    full, target = random_problem((4, num_classes), seed=5)
    shard = _shard(full, rank, sizes)
    for value in (num_classes, -1):  # past the last slice, before the first
        bad_target = target.clone()
        bad_target[1] = value
        fn = functools.partial(vocab_parallel, shard, bad_target, 0.1)
        failures.raises(f"target {value}", ValueError, f"out of range for C={num_classes}", fn)
    local_only = torch.full_like(target, sizes[0])  # class C_0: rank 1's first
    failures.check(
        "a target beyond rank 0's slice is valid",
        _finite,
        vocab_parallel(shard, local_only, 0.1),
    )
    cases = [
        ("smoothing 1.5", ValueError, "smoothing must be in [0, 1]", lambda: vocab_parallel(shard, target, 1.5)),
        ("smoothing str", TypeError, "smoothing must be a float", lambda: vocab_parallel(shard, target, "0.1")),
        ("reduction", ValueError, "reduction must be one of", lambda: vocab_parallel(shard, target, reduction="avg")),
        ("target shape", ValueError, "does not match input shape", lambda: vocab_parallel(shard, target[:3])),
        ("float target", TypeError, "target must be an integer tensor", lambda: vocab_parallel(shard, target.float())),
        ("integer logits", TypeError, "floating point", lambda: vocab_parallel(shard.long(), target)),
        ("weight shape", ValueError, "weight must have shape", lambda: vocab_parallel(shard, target, weight=torch.ones(num_classes + 1))),
        ("weight, sparse", ValueError, "no class-weighted form", lambda: vocab_parallel(shard, target, sparse=True, weight=torch.ones(num_classes))),
        ("offsets", ValueError, "class_offset", lambda: vocab_parallel(shard, target, class_offset=0)),
    ]  # fmt: skip
    for label, error, match, fn in cases:
        failures.raises(label, error, match, fn)
    one_class = [1] + [0] * (world - 1)
    failures.raises(
        "sparse, C = 1",
        ValueError,
        "at least 2 classes, got C=1",
        lambda: vocab_parallel(
            torch.randn(3, one_class[rank]), torch.zeros(3, dtype=torch.long), 0.1, sparse=True
        ),
    )
    failures.done()


def _finite(loss):
    assert torch.isfinite(loss).all(), loss


def check_collectives(rank, world, group):
    """One collective forward with class_offset, two without; none backward."""
    vocab_parallel = functools.partial(vocab_parallel_label_smoothing, group=group)
    failures = Failures()
    sizes = LAYOUTS[world][0]
    full, target = random_problem((6, sum(sizes)), seed=8)
    calls = []
    gather = lsr.parallel.dist.all_gather_single

    def counting(*args, **kwargs):
        calls.append("all_gather")
        return gather(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a collective in the backward pass")

    names = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast")
    saved = {name: getattr(dist, name) for name in names}
    try:
        for offset, expected in ((_offsets(sizes)[rank], 1), (None, 2)):
            calls.clear()
            dist.all_gather_single = counting
            shard = _shard(full, rank, sizes).clone().requires_grad_(True)
            loss = vocab_parallel(shard, target, 0.1, class_offset=offset)
            failures.check(f"forward collectives, class_offset={offset}", _equal, len(calls), expected)
            for name in names:
                setattr(dist, name, refuse)
            try:
                loss.backward()
            except AssertionError as error:
                failures.append(str(error))
            finally:
                for name in names:
                    setattr(dist, name, saved[name])
    finally:
        for name in names:
            setattr(dist, name, saved[name])
    failures.done()


CHECKS = {
    "reference": check_reference,
    "megatron": check_megatron,
    "bad_input": check_bad_input,
    "collectives": check_collectives,
}


def _worker(rank, store_path, out_dir):
    """Runs every check over all 3 ranks, then over ranks 0 and 1 as a group of their own."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 3)
    # A rank that falls out of step fails its next collective after this, instead of hanging the run
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timeout)
    groups = {3: None, 2: dist.new_group([0, 1])}  # every rank takes part in making a group
    outcomes = {}
    for world, group in groups.items():
        if rank >= world:
            continue
        for name, check in CHECKS.items():
            try:
                check(rank, world, group)
                outcomes[f"{name}/{world}"] = None
            except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
                outcomes[f"{name}/{world}"] = traceback.format_exc()
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(outcomes))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{"check/world size": every rank's failures, or ""}, from one spawn of 3 processes."""
    out_dir = tmp_path_factory.mktemp("parallel")
    mp.spawn(_worker, args=(str(out_dir / "store"), out_dir), nprocs=3, join=True)
    per_rank = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(3)]
    return {
        key: "\n".join(f"--- rank {rank}:\n{got[key]}" for rank, got in enumerate(per_rank) if got.get(key))
        for key in per_rank[0]
    }


WORLDS = pytest.mark.parametrize("world", sorted(LAYOUTS))


@WORLDS
def test_matches_float64_reference(outcomes, world):
    assert not outcomes[f"reference/{world}"], outcomes[f"reference/{world}"]


@WORLDS
def test_megatron_lm_issue_737_smoothing_over_the_whole_vocabulary(outcomes, world):
    assert not outcomes[f"megatron/{world}"], outcomes[f"megatron/{world}"]


@WORLDS
def test_bad_input_raises_on_every_rank(outcomes, world):
    assert not outcomes[f"bad_input/{world}"], outcomes[f"bad_input/{world}"]


@WORLDS
def test_one_collective_forward_none_backward(outcomes, world):
    assert not outcomes[f"collectives/{world}"], outcomes[f"collectives/{world}"]


def test_needs_an_initialised_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever other tests left behind
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_label_smoothing(torch.randn(2, 3), torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="smoothing must be in"):  # argument checks come first
        vocab_parallel_label_smoothing(torch.randn(2, 3), torch.tensor([0, 1]), -0.1)
