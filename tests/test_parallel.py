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
import time
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

    @staticmethod
    def prefixed(failures, prefix):
        """A view of `failures` whose labels start with `prefix`."""
        view = Failures()
        view.append = lambda text: failures.append(f"{prefix}: {text}")
        return view


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
    """The single-device losses' errors, raised on every rank (all ranks see the same bad input), with
    the ranks' check (the default on CPU) and without it."""
    failures = Failures()
    for check_ranks in (None, False):
        vocab_parallel = functools.partial(
            vocab_parallel_label_smoothing, group=group, check_ranks=check_ranks
        )
        _bad_input_cases(
            rank, world, vocab_parallel, Failures.prefixed(failures, f"check_ranks={check_ranks}")
        )
    failures.done()


def _bad_input_cases(rank, world, vocab_parallel, failures):
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


def _finite(loss):
    assert torch.isfinite(loss).all(), loss


def check_collectives(rank, world, group):
    """Without the ranks' check: one collective forward with class_offset, two without. With it (the
    default on CPU): two either way (the check carries the slices' sizes). None backward. The check
    changes no result."""
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
        losses = {}
        for check_ranks, offset, expected in (
            (False, _offsets(sizes)[rank], 1),
            (False, None, 2),
            (None, _offsets(sizes)[rank], 2),
            (None, None, 2),
            (True, None, 2),
        ):
            calls.clear()
            dist.all_gather_single = counting
            shard = _shard(full, rank, sizes).clone().requires_grad_(True)
            loss = vocab_parallel(shard, target, 0.1, class_offset=offset, check_ranks=check_ranks)
            label = f"check_ranks={check_ranks}, class_offset={offset}"
            failures.check(f"forward collectives, {label}", _equal, len(calls), expected)
            losses[label] = loss.detach()
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
    unchecked = losses["check_ranks=False, class_offset=None"]
    for label, loss in losses.items():  # bit for bit: the check changes nothing the loss computes
        failures.check(f"loss, {label}", torch.testing.assert_close, loss, unchecked, rtol=0, atol=0)
    failures.done()


CHECKS = {
    "reference": check_reference,
    "megatron": check_megatron,
    "bad_input": check_bad_input,
    "collectives": check_collectives,
}

# --- ranks that disagree ------------------------------------------------------------------------------------
# Each case: (world, what each rank passes: rank -> (shard, target, keyword arguments), from the agreeing
# ones; {rank: words its ValueError must hold}). Slices [3, 7] (2 ranks), [2, 5, 3] (3 ranks), N = 4.


def _changed(target, value, at=2):
    target = target.clone()
    target[at] = value
    return target


def _one_rank(rank, odd, agreed, differs):
    return differs if rank == odd else agreed


def _vary(**kwargs):
    """The same shard and target on every rank; the keyword arguments of `kwargs[name](rank)`."""
    return lambda rank, shard, target: (shard, target, {k: f(rank) for k, f in kwargs.items()})


def _on_rank_1(agreed, differs):
    return lambda rank: _one_rank(rank, 1, agreed, differs)


ALL_2 = (0, 1)
MISMATCHES = {
    "targets": (
        2,
        lambda rank, shard, target: (shard, _changed(target, 1) if rank == 1 else _changed(target, 0), {}),
        dict.fromkeys(ALL_2, ["disagree on the targets", "rank 0 has checksum", "rank 1 has checksum"]),
    ),
    "smoothing": (
        2,
        _vary(smoothing=_on_rank_1(0.1, 0.2)),
        dict.fromkeys(ALL_2, ["disagree on smoothing: rank 0 has 0.1, rank 1 has 0.2"]),
    ),
    "reduction": (
        2,
        _vary(reduction=_on_rank_1("mean", "sum")),
        dict.fromkeys(ALL_2, ["disagree on reduction: rank 0 has 'mean', rank 1 has 'sum'"]),
    ),
    "weight values": (
        2,
        _vary(weight=lambda rank: torch.arange(10.0) + 1 + (rank == 1)),
        dict.fromkeys(ALL_2, ["disagree on the weight values", "rank 0 has checksum", "rank 1 has checksum"]),
    ),
    "weight on one rank": (
        2,
        _vary(weight=_on_rank_1(None, torch.ones(10))),
        dict.fromkeys(ALL_2, ["disagree on weight: rank 0 has None, rank 1 has a (10,) tensor"]),
    ),
    "sparse on one rank": (
        2,
        _vary(sparse=_on_rank_1(False, True)),
        dict.fromkeys(ALL_2, ["disagree on sparse: rank 0 has False, rank 1 has True"]),
    ),
    "target out of range on one rank": (
        2,
        lambda rank, shard, target: (shard, _changed(target, 10) if rank == 1 else target, {}),
        {0: ["rank 1 has target value 10, out of range for C=10"], 1: ["target value 10 is out of range for C=10"]},
    ),
    "invalid smoothing on one rank": (
        2,
        _vary(smoothing=_on_rank_1(0.1, 1.5)),
        {0: ["rank 1 rejected its arguments", "smoothing must be in [0, 1], got 1.5"], 1: ["smoothing must be in [0, 1], got 1.5"]},
    ),
    "N": (
        2,
        lambda rank, shard, target: (shard[: 4 - rank], target[: 4 - rank], {}),
        dict.fromkeys(ALL_2, ["disagree on N, the targets' first dimension: rank 0 has 4, rank 1 has 3"]),
    ),
    "target shape": (
        2,
        lambda rank, shard, target: (shard.unsqueeze(-1).expand(-1, -1, 2 + rank), target.unsqueeze(-1).expand(-1, 2 + rank), {}),
        dict.fromkeys(ALL_2, ["disagree on the target shape: rank 0 has (4, 2), rank 1 has (4, 3)"]),
    ),
    "dtype": (
        2,
        lambda rank, shard, target: (shard.double() if rank == 1 else shard, target, {}),
        dict.fromkeys(ALL_2, ["disagree on the logits' dtype: rank 0 has torch.float32, rank 1 has torch.float64"]),
    ),
    "class_offset on one rank": (
        2,
        _vary(class_offset=_on_rank_1(0, None)),
        dict.fromkeys(ALL_2, ["disagree on whether class_offset is given", "rank 0 has class_offset=0, rank 1 has None"]),
    ),
    "smoothing, 3 ranks": (
        3,
        _vary(smoothing=lambda rank: _one_rank(rank, 2, 0.1, 0.2)),
        dict.fromkeys((0, 1, 2), ["disagree on smoothing: ranks 0, 1 have 0.1, rank 2 has 0.2"]),
    ),
    "invalid class_offset on one rank, 3 ranks": (
        3,
        _vary(class_offset=lambda rank: _one_rank(rank, 2, [0, 2, 7][rank], -1)),
        {**dict.fromkeys((0, 1), ["rank 2 rejected its arguments", "class_offset must be >= 0"]), 2: ["class_offset must be >= 0"]},
    ),
}  # fmt: skip
CASE_LIMIT = 30  # seconds for one case, on every rank; its groups time out after 20
DEADLINE = 240  # seconds for the whole spawn: a rank that hangs or aborts fails the tests, never stalls them


def run_mismatch(rank, world, group, make):
    """What `vocab_parallel_label_smoothing` raised on this rank: (error type, message), or (None, loss)."""
    sizes = LAYOUTS[world][0]
    full, target = random_problem((4, sum(sizes)), seed=24)
    shard, target, kwargs = make(rank, _shard(full, rank, sizes), target)
    kwargs = {"smoothing": 0.1, **kwargs}
    try:
        loss = vocab_parallel_label_smoothing(shard, target, group=group, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported to the parent
        return type(error).__name__, str(error)
    return None, f"no error: loss {loss.tolist()}"


def check_agreeing(rank, world, group):
    """After the disagreements, ranks that agree are still in step and give F.cross_entropy's loss on
    the unsharded logits, weighted or not, the check on (the default on CPU) or off."""
    failures = Failures()
    sizes = LAYOUTS[world][0]
    full, target = random_problem(
        (6, sum(sizes)), scale=2.0, ignore_fraction=0.3, seed=4, ignore_index=IGNORE
    )
    for weight in (None, torch.rand(sum(sizes), generator=torch.Generator().manual_seed(4)) + 0.5):
        expected = F.cross_entropy(full, target, weight=weight, label_smoothing=0.1, ignore_index=IGNORE)
        for check_ranks in (None, True, False):
            loss = vocab_parallel_label_smoothing(
                _shard(full, rank, sizes),
                target,
                0.1,
                group=group,
                weight=weight,
                ignore_index=IGNORE,
                check_ranks=check_ranks,
            )
            label = f"weighted={weight is not None} check_ranks={check_ranks}"
            failures.check(label, torch.testing.assert_close, loss, expected)
    failures.done()


def _record(out_dir, rank, key, start, **entry):
    entry |= {"key": key, "rank": rank, "seconds": time.monotonic() - start}
    with open(out_dir / f"rank{rank}.jsonl", "a") as file:  # line by line: what a hang leaves still counts
        file.write(json.dumps(entry) + "\n")


def _run_check(rank, out_dir, key, check, *args):
    start = time.monotonic()
    try:
        check(rank, *args)
        _record(out_dir, rank, key, start, error=None)
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
        _record(out_dir, rank, key, start, error=traceback.format_exc())


def _worker(rank, store_path, out_dir):
    """Runs every check over all 3 ranks, then over ranks 0 and 1 as a group of their own; then the
    disagreements, over groups that time out after 20 s, and agreeing ranks once more."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 3)
    # A rank that falls out of step fails its next collective after this, instead of hanging the run
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timeout)
    groups = {3: None, 2: dist.new_group([0, 1])}  # every rank takes part in making a group
    quick = datetime.timedelta(seconds=20)
    quick_groups = {3: dist.new_group([0, 1, 2], timeout=quick), 2: dist.new_group([0, 1], timeout=quick)}
    for world, group in groups.items():
        if rank < world:
            for name, check in CHECKS.items():
                _run_check(rank, out_dir, f"{name}/{world}", check, world, group)
    store.set(f"checked {rank}", "1")  # the disagreements start together, within their groups' timeout
    store.wait([f"checked {r}" for r in range(3)], datetime.timedelta(seconds=DEADLINE))
    for name, (world, make, _) in MISMATCHES.items():
        if rank < world:
            start = time.monotonic()
            error, message = run_mismatch(rank, world, quick_groups[world], make)
            _record(out_dir, rank, f"mismatch/{name}", start, error=error, message=message)
    for world, group in quick_groups.items():
        if rank < world:
            _run_check(rank, out_dir, f"agreeing/{world}", check_agreeing, world, group)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """{(key, rank): what the rank recorded}, from one spawn of 3 processes, given DEADLINE seconds."""
    out_dir = tmp_path_factory.mktemp("parallel")
    context = mp.start_processes(
        _worker, args=(str(out_dir / "store"), out_dir), nprocs=3, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE
    try:
        while not context.join(timeout=1) and time.monotonic() < deadline:
            pass
    except (
        mp.ProcessExitedException,
        mp.ProcessRaisedException,
    ):  # a rank died (the others are stopped): its records so far count
        pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    found = {}
    for rank in range(3):
        path = out_dir / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            entry = json.loads(line)
            found[entry["key"], entry["rank"]] = entry
    return found


UNFINISHED = (
    f"did not finish: it hung past the {DEADLINE} s deadline, aborted, or was stopped when another rank died"
)


def _entry(records, key, rank):
    """What `rank` recorded for `key`; a rank that recorded nothing failed with UNFINISHED."""
    return records.get((key, rank), {"error": UNFINISHED, "message": "(no record)", "seconds": float("inf")})


@pytest.fixture(scope="module")
def outcomes(records):
    """{"check/world size": every rank's failures, or ""}."""

    def failures(key, world):
        errors = [_entry(records, key, rank)["error"] for rank in range(world)]
        return "\n".join(f"--- rank {rank}:\n{error}" for rank, error in enumerate(errors) if error)

    return {f"{name}/{w}": failures(f"{name}/{w}", w) for name in [*CHECKS, "agreeing"] for w in LAYOUTS}


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


@pytest.mark.parametrize("case", MISMATCHES)
def test_ranks_that_disagree_raise_together(records, case):
    """Issue 24, point 4: every rank raises the same kind of ValueError, in time, never a hang, an abort,
    a wrong loss, or one rank raising alone."""
    world, _, words = MISMATCHES[case]
    for rank in range(world):
        entry = _entry(records, f"mismatch/{case}", rank)
        assert entry["error"] == "ValueError", f"rank {rank}: {entry['error']}: {entry['message']}"
        for word in words[rank]:
            assert word in entry["message"], f"rank {rank}: {word!r} not in {entry['message']!r}"
        assert entry["seconds"] < CASE_LIMIT, f"rank {rank} took {entry['seconds']:.1f} s"


@WORLDS
def test_agreeing_ranks_give_the_unsharded_loss_after_disagreements(outcomes, world):
    assert not outcomes[f"agreeing/{world}"], outcomes[f"agreeing/{world}"]


def test_needs_an_initialised_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever other tests left behind
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_label_smoothing(torch.randn(2, 3), torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError, match="smoothing must be in"):  # argument checks come first
        vocab_parallel_label_smoothing(torch.randn(2, 3), torch.tensor([0, 1]), -0.1)


# --- the check's cost: python tests/test_parallel.py ---------------------------------------------------------


def _time_the_check(rank, store_path, repetitions):
    """Medians over `repetitions` of the loss with and without the ranks' check (alternating, after
    3 warm-up rounds, the ranks started together by a barrier), class_offset given or not, and of the
    check alone."""
    from lsr._common import as_rows
    from lsr.parallel_checks import RankArguments, agree_across_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    n_rows, num_classes = 1024, 32000
    shard = torch.randn(n_rows, num_classes // 2, generator=torch.Generator().manual_seed(rank))
    target = torch.randint(0, num_classes, (n_rows,), generator=torch.Generator().manual_seed(0))
    times = {}

    def timed(label, fn):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.setdefault(label, []).append(1e3 * (time.perf_counter() - start))

    def loss(x, check, offset, backward):
        out = vocab_parallel_label_smoothing(x, target, 0.1, class_offset=offset, check_ranks=check)
        return out.backward() if backward else out

    cases = [(offset, backward) for offset in (None, rank * num_classes // 2) for backward in (False, True)]
    for i in range(3 + repetitions):
        for check in (True, False) if i % 2 else (False, True):
            for offset, backward in cases:
                x = shard.clone().requires_grad_(True) if backward else shard
                timed((check, offset, backward), functools.partial(loss, x, check, offset, backward))
    rows = as_rows(shard, target, -100, validate_targets=False)
    args = RankArguments(rows, None, 0.1, "mean", False, -100, None, True)
    for _ in range(3 + 10 * repetitions):
        timed("check", functools.partial(agree_across_ranks, args, None, None, shard.device))
    median = {label: sorted(t[3:])[len(t[3:]) // 2] for label, t in times.items()}
    for offset, backward in cases:
        with_check, without = median[True, offset, backward], median[False, offset, backward]
        print(
            f"rank {rank}: {'forward+backward' if backward else 'forward'}, class_offset={offset}: "
            f"{with_check:.2f} ms with the check, {without:.2f} ms without ({with_check - without:+.2f} ms)"
        )
    print(f"rank {rank}: the check alone: {median['check']:.3f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 21
        mp.spawn(_time_the_check, args=(os.path.join(folder, "store"), repetitions), nprocs=2)
