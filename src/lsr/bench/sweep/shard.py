"""One sweep shared by the ranks of a torchrun launch: who this rank is, which cases are its own, the
few collectives that keep the ranks of one run together, and what the runner's sharded path asks of
them (the output lock taken in turn, each rank's GPU, what metadata.json records of each rank, and
the hosts where several ranks share one CPU).

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT) starts the ranks; `Shard.start` joins them with torch.distributed's own rendezvous. The
ranks talk over gloo whatever their devices measure: a few small Python objects (case lists, rows,
verdicts), never tensors, so NCCL would add nothing, and gloo works on every host.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lsr.bench.data import Case
from lsr.bench.data.lock import SweepLocked, run_lock
from lsr.types import DTYPES

__all__ = ["SHARED_DEVICES", "Shard", "share", "size_of"]

T = TypeVar("T")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The ranks meet after measuring their shares, which on a large sweep end hours apart: a collective
# waits this long. A rank that dies ends the launch sooner: torchrun stops the others.
TIMEOUT = datetime.timedelta(days=1)
# A case's fixed cost (warm-up, the gate, the memory meters: about 0.1 s on a CPU), in the logits
# bytes that take about as long to measure; what `share` weighs a size's cases by, beside their bytes.
CASE_OVERHEAD_BYTES = 16 * 2**20


def size_of(case: Case) -> tuple:
    """A size: the cases with these (device, dtype, N, C, and a head case's H) share their floors,
    and, by ignore fraction and weights, their inputs."""
    return case.device, case.dtype, case.batch, case.classes, case.hidden


def share(cases: list[Case], rank: int, world_size: int) -> list[Case]:
    """Rank `rank`'s cases of `cases`, in their order: whole sizes, so that a rank makes each set of
    inputs once and times an implementation beside its floors on one device. Sizes are dealt largest
    first, each to the rank with the least work so far (work: each case's logits bytes plus
    CASE_OVERHEAD_BYTES); every rank computes the same split from the same cases.

    >>> cases = [Case(name, "cpu", "float32", n, 10, 0.1, "forward") for n in (8, 4, 2) for name in ("floor", "native")]
    >>> [(c.implementation, c.batch) for c in share(cases, 1, 2)]
    [('floor', 4), ('native', 4), ('floor', 2), ('native', 2)]
    """
    sizes: dict[tuple, int] = {}
    for case in cases:
        bytes_ = case.batch * case.classes * DTYPES[case.dtype].itemsize
        sizes[size_of(case)] = sizes.get(size_of(case), 0) + bytes_ + CASE_OVERHEAD_BYTES
    work, owner = [0] * world_size, {}
    for size in sorted(sizes, key=lambda s: -sizes[s]):  # stable: equal sizes in the sweep's order
        least = min(range(world_size), key=work.__getitem__)
        owner[size], work[least] = least, work[least] + sizes[size]
    return [case for case in cases if owner[size_of(case)] == rank]


@dataclass
class Shard:
    """This process's place in a launch of `world_size` ranks, and the gloo group they talk over.

    run_id: the same on every rank of one launch and on no other (rank 0's, broadcast): what the
    output directory's lock admits. host: this rank's host name, to tell ranks that share a host.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    run_id: str
    host: str
    group: Any = None  # None: the default group, which `start` made and `stop` ends
    launcher_run_id: str | None = None  # TORCHELASTIC_RUN_ID, for the record ("none" without a rendezvous id)

    @classmethod
    def start(cls) -> Shard | None:
        """Join the launch this process belongs to; None when it was not started as one of several ranks.

        Raises ValueError naming what is missing when WORLD_SIZE says several ranks but the launcher
        left out the rest of torchrun's variables.
        """
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return None
        missing = [name for name in LAUNCH_VARIABLES if name not in env]
        if missing:
            raise ValueError(
                f"WORLD_SIZE is {env['WORLD_SIZE']} but {', '.join(missing)} not set: launch with torchrun"
            )
        group = None
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        else:  # the caller's group, maybe NCCL: ours is a gloo group of the same ranks
            group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        shard = cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env["LOCAL_WORLD_SIZE"]),
            run_id="",
            host=socket.gethostname(),
            group=group,
            launcher_run_id=env.get("TORCHELASTIC_RUN_ID"),
        )
        shard.run_id = shard.broadcast(uuid.uuid4().hex if shard.rank == 0 else None)
        return shard

    def stop(self) -> None:
        """Leave the launch: end the process group `start` made."""
        with contextlib.suppress(AssertionError, ValueError, RuntimeError):  # already ended
            if self.group is None:
                dist.destroy_process_group()
            else:
                dist.destroy_process_group(self.group)

    # --- collectives: every rank calls each, in the same order ------------------------------------------

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast(self, value: T) -> T:
        """Rank 0's `value`, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, value: T) -> list[T]:
        """Every rank's `value`, by rank, on every rank."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def settle(self, error: BaseException | None) -> None:
        """Raise on every rank the first error any rank had (None: no error), so that all go on or
        none does."""
        errors = self.all_gather(error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def each(self, work: Callable[[], T]) -> T:
        """work() done by every rank; what any rank raised, raised on every rank."""
        result, error = None, None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - raised again by settle, on every rank
            error = e
        self.settle(error)
        return result

    def on_rank_zero(self, work: Callable[[], T]) -> T:
        """work() done by rank 0, its result on every rank; what it raised, raised on every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001 - raised again below, on every rank
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result

    def require_same(self, value: Any, what: str) -> None:
        """Refuse (ValueError, on every rank) unless every rank has the same `value`: ranks with other
        grids or devices would measure cases no one else knows of, or none of some."""
        values = self.all_gather(value)
        differing = [rank for rank, other in enumerate(values) if other != values[0]]
        if differing:
            raise ValueError(
                f"the ranks disagree on {what}: rank {differing[0]} differs from rank 0 "
                "(same command, same software and the same devices on every host)"
            )


def lock_in_turn(out_dir: Path, shard: Shard, cleanup: contextlib.ExitStack) -> None:
    """Each rank in turn takes out_dir's lock for this run, or joins it where a rank before it holds
    it (on a shared file system, or on its host's disk); SweepLocked on every rank if any was refused."""
    error = None
    for turn in range(shard.world_size):
        if turn == shard.rank:
            try:
                who = f"rank {shard.rank} of {shard.world_size}"
                cleanup.enter_context(run_lock(out_dir, shard.run_id, who))
            except SweepLocked as e:
                error = e
        shard.barrier()
    shard.settle(error)


def cuda_device_of(cases: list[Case], shard: Shard) -> int | None:
    """The GPU this rank measures on, its LOCAL_RANK, made the current one; None without CUDA cases."""
    if not any(torch.device(case.device).type == "cuda" for case in cases):
        return None
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise ValueError(
            f"rank {shard.rank} is local rank {shard.local_rank} on {shard.host}, which has {count} "
            f"GPUs: one rank per GPU (torchrun --nproc-per-node {count} or fewer)"
        )
    torch.cuda.set_device(shard.local_rank)
    return shard.local_rank


def rank_record(shard: Shard, metadata: dict, cases: int, cuda_device: int | None) -> dict:
    """What metadata.json records of one rank."""
    own = {k: metadata.get(k) for k in ("machine", "device_name", "copy_bandwidth_bytes_per_s", "threads")}
    where = {
        "rank": shard.rank,
        "local_rank": shard.local_rank,
        "host": shard.host,
        "cuda_device": cuda_device,
    }
    return where | own | {"cases": cases}


# Devices a host has one of, which all its ranks then share.
SHARED_DEVICES = ("cpu", "mps")


def shared_hosts(ranks: list[dict], cases: list[Case], shard: Shard) -> tuple[dict[str, int], str]:
    """The hosts where several ranks measured on the one CPU (or MPS device) at once, with how many;
    and the note this rank's rows then carry (empty where its host has one rank)."""
    if not any(torch.device(case.device).type in SHARED_DEVICES for case in cases):
        return {}, ""
    shared = {host: n for host, n in Counter(r["host"] for r in ranks).items() if n > 1}
    if shard.host not in shared:
        return shared, ""
    return shared, f"shared host: {shared[shard.host]} ranks measured on {shard.host} at once"


def shared_warning(shared: dict[str, int]) -> str:
    hosts = ", ".join(f"{n} on {host}" for host, n in shared.items())
    return (
        f"several ranks measured on one host's CPU at once ({hosts}): their times disturb each other's "
        "(each row says so in its message; column busy where the load was measured): on CPU, shard "
        "with one rank per host"
    )
