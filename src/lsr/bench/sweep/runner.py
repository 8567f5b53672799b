"""Running a sweep: every case gated, timed and metered; failures recorded, rows kept as they come.

What a sweep guarantees: one writer per output directory (a lock, `SweepLocked`); the results file
rewritten atomically after every row, so an interruption (`SweepInterrupted`) or a crash loses at
most the case being measured; resume re-measures only this grid's cases not measured ok, keeps every
other row as it was, and refuses rows measured with other settings; with `isolate`, a case that
kills its process costs its row only.

Sharded over the ranks of a torchrun launch (`shard`), each rank measures its share of the cases
(whole sizes, `lsr.bench.sweep.shard.share`) on its own device into its own part file, and rank 0 merges
the parts into results.csv at the end (`lsr.bench.data.merge`); the guarantees above hold for the run as
a whole.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import pickle
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from lsr.bench.data import (
    BUSY_LOAD,
    METADATA_FILE,
    RESULTS_FILE,
    Case,
    busy_rows,
    case_key,
    merge,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)
from lsr.bench.data.lock import LOCK_FILE, SweepLocked, output_lock  # noqa: F401 - LOCK_FILE: the sweep's lock, for callers
from lsr.bench.measure import environment
from lsr.bench.sweep.case import isolated_rows, measure_cases
from lsr.bench.sweep.shard import (
    Shard,
    cuda_device_of,
    lock_in_turn,
    rank_record,
    share,
    shared_hosts,
    shared_warning,
    size_of,
)
from lsr.types import LossFn

__all__ = [
    "BusyMachineWarning",
    "ResumeRefused",
    "SharedHostWarning",
    "SweepInterrupted",
    "SweepLocked",
    "run_sweep",
]

ISOLATION = (None, "case", "size")
# The run-wide columns that change what a row measures (threads is part of the case since schema 5)
SETTINGS = ("min_time", "logit_std")


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the rows measured so far are on disk; `done` of `total` cases this run set
    out to measure were measured."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted after {done} of {total} cases")
        self.done, self.total = done, total


class ResumeRefused(ValueError):
    """Resuming would mix rows measured with different settings in one file."""


class BusyMachineWarning(UserWarning):
    """Some cases were timed while other processes used a share of the machine."""


class SharedHostWarning(UserWarning):
    """Several ranks of a sharded sweep measured on one host's CPU (or its one MPS device) at once."""


def _groups(cases: list[Case], isolate: str | None) -> list[list[Case]]:
    if isolate is None:
        return [cases]
    if isolate == "case":
        return [[case] for case in cases]
    return [list(group) for _, group in itertools.groupby(cases, key=size_of)]


# --- the output directory: one writer, resume ---------------------------------------------------------


def _row_settings(row: dict, fallback: dict) -> dict:
    # Rows of a schema-1 file carry no settings: they take those of the run's metadata.
    return {k: fallback.get(k) if row.get(k) is None else row[k] for k in SETTINGS}


def previous_rows(out_dir: Path, cases: list[Case], settings: dict, resume_mixed: bool) -> dict[tuple, dict]:
    """out_dir's rows by case key, every one kept: those of `cases` not ok are measured again (and
    replaced), the rest stay as they were. Refused when a row that stays was measured with settings
    other than `settings`, unless `resume_mixed`."""
    rows = read_rows(out_dir / RESULTS_FILE)
    fallback = read_metadata(out_dir).get("settings", {})
    for row in rows:
        row.update(_row_settings(row, fallback))
    wanted = {case.key() for case in cases}
    staying = [row for row in rows if row["status"] == "ok" or case_key(row) not in wanted]
    others = [row for row in staying if _row_settings(row, {}) != settings]
    if others and not resume_mixed:
        raise ResumeRefused(
            f"cannot resume {out_dir}: {len(others)} rows kept were measured with "
            f"{_row_settings(others[0], {})}, this run uses {settings}; start afresh in another --out, "
            "or resume_mixed=True (--resume-mixed) to keep them"
        )
    return {case_key(row): row for row in rows}


def _metadata(out_dir: Path, cases: list[Case], settings: dict, resume: bool, **extra) -> dict:
    """The run's environment (its copy bandwidths measured now, at the sweep's thread count), settings
    and grid, and the earlier runs' when resuming."""
    devices = sorted({case.device for case in cases}) or ["cpu"]
    metadata = environment(",".join(devices), **extra)
    metadata["settings"] = settings
    metadata["thread_counts"] = sorted({case.threads for case in cases if case.threads is not None})
    previous = read_metadata(out_dir) if resume else {}
    if previous:
        metadata["resumed"] = [
            *previous.get("resumed", []),
            {k: previous.get(k) for k in ("git_commit", "date", "grid", "settings")},
        ]
    return metadata


# --- the sweep ------------------------------------------------------------------------------------------


def _check_isolation(isolate: str | None, loss_fns: dict[str, LossFn]) -> None:
    if isolate not in ISOLATION:
        raise ValueError(f"isolate must be one of {ISOLATION}, got {isolate!r}")
    if isolate is None:
        return
    in_main = [name for name, fn in loss_fns.items() if getattr(fn, "__module__", None) == "__main__"]
    if in_main:
        raise ValueError(f"with isolate, loss_fns must be importable; {in_main} are defined in __main__")
    try:
        pickle.dumps(loss_fns)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise ValueError(
            f"with isolate, loss_fns must be importable (module-level) functions: the child imports them ({e})"
        ) from None


def _record(
    rows: dict,
    todo: list[Case],
    path: Path,
    isolate: str | None,
    args: tuple,
    progress: bool,
    note: str = "",
) -> int:
    """Measure `todo` into `rows`, rewriting the results file at `path` after each, with `note` added
    to each row's message; return how many were measured."""
    done = 0
    with tqdm(total=len(todo), disable=not progress, unit="case", dynamic_ncols=True) as bar:
        try:
            for group in _groups(todo, isolate):
                source = measure_cases(group, *args) if isolate is None else isolated_rows(group, *args)
                for row in source:
                    if note:
                        row["message"] = "; ".join(filter(None, [row["message"], note]))
                    rows[case_key(row)] = row
                    write_rows(path, list(rows.values()))
                    done += 1
                    bar.set_postfix_str(
                        f"{row['implementation']} {row['pass']} N={row['batch']} C={row['classes']} {row['dtype']}"
                    )
                    bar.update()
        except KeyboardInterrupt as e:
            raise SweepInterrupted(done, len(todo)) from e
    return done


def run_sweep(
    cases: Iterable[Case],
    out_dir: Path,
    *,
    resume: bool = False,
    resume_mixed: bool = False,
    isolate: str | None = None,
    grid: dict | None = None,
    preset: str | None = None,
    logit_std: float = 2.0,
    min_time: float = 0.5,
    loss_fns: dict[str, LossFn] | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[dict]:
    """Measure `cases` into out_dir/results.csv, rewriting it (atomically) after every row; return
    every row of the file.

    resume: keep the rows already in out_dir and skip the cases measured ok; this grid's cases that
    are not ok are measured again, rows of other cases are kept as they were. Refused (ResumeRefused)
    when a row kept was measured with other settings (min_time, logit_std).
    resume_mixed: resume anyway, keeping those rows: the file then mixes rows measured two ways (each
    row says how; metadata["resumed"] lists the earlier runs' settings).
    isolate: None measures in this process; "case" runs each case in a child process, "size" each
    size's cases, so that a case that runs out of memory or crashes costs its row, not the sweep.
    grid: the grid's fields, stored in metadata.json. loss_fns: overrides of the registry's functions
    by name (tests plant wrong or failing ones; with isolate they must be importable).
    shard: this process's rank of a torchrun launch (`Shard.start()`), every rank calling run_sweep
    with the same cases and options: each measures its share (on CUDA, the GPU of its LOCAL_RANK)
    into out_dir/parts/rank-K.csv, and rank 0 merges the parts into results.csv once all are done.
    Rank 0 returns every row of the file, the others the rows they measured. Ranks that measure on
    one host's CPU at once disturb each other: rank 0 warns (SharedHostWarning), metadata.json says
    so under "shard", and each of their rows says so in its message.

    Raises SweepLocked when another sweep holds out_dir, and SweepInterrupted on Ctrl-C (the rows
    measured are kept, in a sharded sweep in its parts: a resume folds them in). Warns
    (BusyMachineWarning) when other processes used more than BUSY_LOAD of the machine while cases
    were timed: `busy_rows` finds them.
    """
    # Each case once, at its thread count: torch's own now for a case that names none
    now = torch.get_num_threads()
    cases = list(dict.fromkeys(c if c.threads is not None else replace(c, threads=now) for c in cases))
    loss_fns = dict(loss_fns or {})
    _check_isolation(isolate, loss_fns)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and merge.MACHINES in read_metadata(out_dir):  # rows of one case on several machines
        raise ValueError(
            f"cannot resume {out_dir}: it holds the results of several machines (lsr-bench merge)"
        )
    settings = {"min_time": min_time, "logit_std": logit_std}
    run = Run(cases, out_dir, settings, resume, resume_mixed, isolate, loss_fns, progress)
    record = {"preset": preset, "grid": grid, "isolate": isolate}
    return run.alone(record) if shard is None else run.sharded(shard, record)


def _warn_busy(measured: list[dict]) -> None:
    busy = busy_rows(measured)
    if busy:
        warnings.warn(
            f"{len(busy)} of {len(measured)} cases were timed while other processes used more than "
            f"{BUSY_LOAD:.0%} of the machine (column busy): their times may be inflated",
            BusyMachineWarning,
            stacklevel=4,  # run_sweep's caller: _warn_busy, Run.alone or Run.sharded, run_sweep
        )


@dataclass
class Run:
    """One call of run_sweep: its cases, where they go and how they are measured."""

    cases: list[Case]
    out_dir: Path
    settings: dict
    resume: bool
    resume_mixed: bool
    isolate: str | None
    loss_fns: dict[str, LossFn]
    progress: bool

    def args(self, metadata: dict, cuda_device: int | None = None) -> tuple:
        """measure_cases' arguments after the cases."""
        copy = metadata["copy_bandwidth_bytes_per_s"]
        s = self.settings
        return s["logit_std"], s["min_time"], self.loss_fns, torch.get_num_threads(), copy, cuda_device

    def alone(self, record: dict) -> list[dict]:
        """The sweep in this process alone."""
        out_dir = self.out_dir
        with output_lock(out_dir), contextlib.ExitStack() as cleanup:
            cleanup.callback(gc.unfreeze)  # collect_garbage's freezes
            if self.resume:
                merge.fold_parts(out_dir)  # the rows an interrupted sharded sweep left in its parts
            else:
                merge.remove(merge.part_files(out_dir))
            resuming = self.resume and (out_dir / RESULTS_FILE).exists()
            rows = previous_rows(out_dir, self.cases, self.settings, self.resume_mixed) if resuming else {}
            todo = [case for case in self.cases if rows.get(case.key(), {}).get("status") != "ok"]
            metadata = _metadata(out_dir, self.cases, self.settings, resuming, **record)
            write_metadata(out_dir / METADATA_FILE, metadata)
            _record(rows, todo, out_dir / RESULTS_FILE, self.isolate, self.args(metadata), self.progress)
        _warn_busy([rows[case.key()] for case in todo])
        return list(rows.values())

    def sharded(self, shard: Shard, record: dict) -> list[dict]:
        """This rank's share of the sweep, and on rank 0 the merge of every rank's rows."""
        shard.require_same([case.key() for case in self.cases], "the cases to measure")
        mine = share(self.cases, shard.rank, shard.world_size)
        with contextlib.ExitStack() as cleanup:
            lock_in_turn(self.out_dir, shard, cleanup)
            cleanup.callback(gc.unfreeze)
            previous = self._previous_sharded(shard)
            cuda_device = shard.each(lambda: cuda_device_of(self.cases, shard))
            metadata = _metadata(self.out_dir, self.cases, self.settings, self.resume, **record)
            ranks = shard.all_gather(rank_record(shard, metadata, len(mine), cuda_device))
            shared, note = shared_hosts(ranks, self.cases, shard)
            metadata["shard"] = {
                "world_size": shard.world_size,
                "run_id": shard.run_id,
                "launcher_run_id": shard.launcher_run_id,
                "ranks": ranks,
                "shared_hosts": shared,
            }
            if shared:
                metadata["warning"] = shared_warning(shared)
            if shard.rank == 0:
                write_metadata(self.out_dir / METADATA_FILE, metadata)
            todo = [case for case in mine if previous.get(case.key(), {}).get("status") != "ok"]
            measured: dict[tuple, dict] = {}
            part = merge.part_path(self.out_dir, shard.rank)
            args = self.args(metadata, cuda_device)
            _record(measured, todo, part, self.isolate, args, self.progress and shard.rank == 0, note)
            everyone = shard.all_gather(list(measured.values()))
            merged: list[dict] = []

            def write_merged() -> None:  # rank 0: every rank's rows, in the sweep's order, after those kept
                rows = dict(previous)
                new = {case_key(row): row for part_rows in everyone for row in part_rows}
                rows.update((case.key(), new[case.key()]) for case in self.cases if case.key() in new)
                write_rows(self.out_dir / RESULTS_FILE, list(rows.values()))
                merged.extend(rows.values())

            shard.on_rank_zero(write_merged)
            merge.remove([part])  # in results.csv now
        if shard.rank != 0:
            return list(measured.values())
        if shared:
            warnings.warn(metadata["warning"], SharedHostWarning, stacklevel=3)
        _warn_busy([row for part_rows in everyone for row in part_rows])
        return merged

    def _previous_sharded(self, shard: Shard) -> dict[tuple, dict]:
        """The rows kept from before, on every rank: rank 0 folds into results.csv the parts an
        interrupted sweep left (each rank sends those its host sees) and checks them as
        `previous_rows` does; a fresh sweep starts from an empty results.csv. The parts folded are
        gone before any rank writes its own."""
        results = self.out_dir / RESULTS_FILE
        paths, seen = shard.each(
            lambda: merge.read_parts(self.out_dir) if self.resume else (merge.part_files(self.out_dir), [])
        )
        gathered = shard.all_gather(seen)

        def fold() -> dict[tuple, dict]:
            kept = read_rows(results) if self.resume and results.exists() else []
            write_rows(results, merge.fold(kept, [row for rows in gathered for row in rows]))
            if not self.resume:
                return {}
            return previous_rows(self.out_dir, self.cases, self.settings, self.resume_mixed)

        previous = shard.on_rank_zero(fold)
        merge.remove(paths)
        shard.barrier()  # every old part is gone before a rank writes its new one
        return previous
