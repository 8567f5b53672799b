"""The commands of `lsr-bench`: `run` (a sweep per device, its charts, tables and summary), `plot`,
`compare` and `merge`."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lsr.bench import measure
from lsr.bench.cli.arguments import SWITCH, Plan, UsageError, check_writable, plans
from lsr.bench.data import (
    RESULTS_FILE,
    Case,
    SchemaError,
    busy_rows,
    case_key,
    load,
    merge,
    read_metadata,
    read_rows,
)
from lsr.bench.report.compare import compare, format_comparison, machine_difference
from lsr.bench.report.plot import chart_folders, plot_run
from lsr.bench.report.ship import format_ship_report
from lsr.bench.report.side_by_side import plot_side_by_side, shared_shapes
from lsr.bench.report.summary import format_run_table, write_summary
from lsr.bench.sweep import (
    SHARED_DEVICES,
    BusyMachineWarning,
    Shard,
    SweepInterrupted,
    present_devices,
    run_sweep,
    share,
)

EXIT_LOCKED = 75  # EX_TEMPFAIL: another process is writing the results; try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def _sweep_options(args, plan: Plan) -> dict:
    """run_sweep's keyword arguments for one device's plan."""
    return dict(
        resume=args.resume or args.resume_mixed,
        resume_mixed=args.resume_mixed,
        isolate=args.isolate,
        grid=plan.grid_record(),
        preset=plan.preset,
        logit_std=args.logit_std,
        min_time=args.min_time,
        progress=not args.no_progress,
    )


@contextmanager
def _warnings_after() -> Iterator[None]:
    """Hold back the warnings raised inside, which would land in the middle of the progress line,
    and print each distinct one once afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", BusyMachineWarning)  # said once for all devices, after the table
        try:
            yield
        finally:
            counts = Counter(f"{w.category.__name__}: {str(w.message).strip()}" for w in caught)
            for text, n in counts.items():
                times = f" ({n} times)" if n > 1 else ""
                print(f"lsr-bench: warning{times}: {text.splitlines()[0]}", file=sys.stderr)


def _rows_kept(out_dir: Path, cases: list[Case]) -> int:
    """How many of `cases` have a row on disk (the runner writes each as it is measured)."""
    try:
        keys = {case_key(r) for r in read_rows(out_dir)}
    except (OSError, SchemaError):
        return 0
    return sum(case.key() in keys for case in cases)


def _interrupted(
    error: BaseException, done_before: int, total: int, out_dir: Path, cases: list[Case], shard: Shard | None
) -> int:
    """One line saying how far the run got, instead of a traceback; the exit status for Ctrl-C."""
    if shard is not None:  # each rank says how far its own share got
        got = f" after {error.done} of its {error.total} cases" if isinstance(error, SweepInterrupted) else ""
        print(
            f"lsr-bench: rank {shard.rank}: interrupted{got}; its rows are in {out_dir / merge.PARTS_DIR}: "
            "rerun with --resume (under torchrun or not) to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if isinstance(error, SweepInterrupted):  # done of total: of the cases not already ok on disk
        done = done_before + len(cases) - error.total + error.done
    else:  # before the sweep started measuring: count what is on disk
        done = done_before + _rows_kept(out_dir, cases)
    print(
        f"lsr-bench: interrupted after {done} of {total} cases; rerun with --resume to continue",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _print_busy_note(rows: list[dict]) -> None:
    busy = busy_rows(rows)
    if busy:
        print(
            f"lsr-bench: warning: {len(busy)} of {len(rows)} rows were measured while other processes "
            "loaded the machine (column busy); their times may be high",
            file=sys.stderr,
        )


def _sharded_devices(shard: Shard) -> list[str]:
    """The devices a sharded run measures by default: CUDA where present (a GPU per rank); a host's
    CPU (or MPS device) only where it has one rank or nothing else, since ranks sharing it disturb
    each other's times."""
    present = present_devices()
    own = [device for device in present if device not in SHARED_DEVICES]
    if shard.local_world_size == 1 or not own:
        return present
    if shard.rank == 0:
        left = ", ".join(d for d in present if d in SHARED_DEVICES)
        print(
            f"lsr-bench: {left} left out: {shard.local_world_size} ranks on a host would time it at once "
            f"(--device {left} to measure it anyway, or launch one rank per host for it)",
            file=sys.stderr,
        )
    return own


def cmd_run(args) -> int:
    shard = Shard.start()  # None unless torchrun started several ranks
    try:
        return _run(args, shard)
    finally:
        if shard is not None:
            shard.stop()


def _refuse_replacing(out_dir: Path, plan: Plan, args, lead: bool) -> None:
    """A sweep never replaces results it did not measure: a folder holding rows measured on another
    machine, at another commit or with another grid is refused, unless --overwrite (which then says
    what it replaces, and removes the old charts) or --resume (which keeps every row)."""
    if args.resume or args.resume_mixed or not (out_dir / RESULTS_FILE).exists():
        return
    try:
        count = len(read_rows(out_dir))
    except (SchemaError, OSError) as e:
        count, problem = None, f" (unreadable: {e})"
    else:
        problem = ""
    if count == 0:
        return
    theirs = read_metadata(out_dir)
    here = {"machine": measure.machine_name(), "git_commit": measure.git_commit(), "grid": plan.grid_record()}
    differ = [key for key, value in here.items() if json.loads(json.dumps(value)) != theirs.get(key)]
    if not differ and not problem:
        return
    what = (
        f"{out_dir} holds {count if count is not None else 'some'} rows{problem} measured on "
        f"{theirs.get('machine') or '?'} at commit {str(theirs.get('git_commit') or '?')[:12]} "
        f"({', '.join(differ) or 'unreadable'} not this run's)"
    )
    if not args.overwrite:
        raise UsageError(f"{what}: --overwrite to replace them, --resume to keep them, or another --out")
    if lead:
        print(f"lsr-bench: --overwrite: replacing what {what}", file=sys.stderr)
        for chart in out_dir.glob("*.png"):
            chart.unlink()


DEFAULT_OUT = {"full": "results", "head": "results/head"}  # others: results/quick


def _run(args, shard: Shard | None) -> int:
    args.out = Path(args.out or DEFAULT_OUT.get(args.preset, "results/quick"))
    if shard is not None and not args.device:
        args.device = _sharded_devices(shard)
    planned = plans(args)
    if shard is not None:
        shard.require_same([(p.device, [c.key() for c in p.cases]) for p in planned], "the devices and cases")
    for plan in planned:
        check_writable(args.out / plan.device, "--out")
        _refuse_replacing(args.out / plan.device, plan, args, lead=shard is None or shard.rank == 0)
    measure.L2_FLUSH["cuda"] = SWITCH[args.l2_flush]
    os.environ[measure.L2_FLUSH_VARIABLE] = args.l2_flush  # for --isolate's child processes
    lead = shard is None or shard.rank == 0  # the one that speaks
    total, done_before, all_rows = sum(len(plan.cases) for plan in planned), 0, []
    for plan in planned:
        out_dir = args.out / plan.device
        over = ""
        if shard is not None:
            over = f" over {shard.world_size} ranks ({len(share(plan.cases, 0, shard.world_size))} on rank 0)"
        if lead:
            print(f"lsr-bench: {len(plan.cases)} cases on {plan.device}{over} -> {out_dir}/", file=sys.stderr)
        try:
            with _warnings_after():
                rows = run_sweep(plan.cases, out_dir, shard=shard, **_sweep_options(args, plan))
        except KeyboardInterrupt as e:  # SweepInterrupted too
            return _interrupted(e, done_before, total, out_dir, plan.cases, shard)
        done_before += len(plan.cases)
        all_rows += rows
        if lead and not args.no_plot:
            skipped: list[str] = []
            plot_run(*load(out_dir), out_dir, skipped)
            for line in skipped:
                print(f"lsr-bench: chart {line}", file=sys.stderr)
    if not lead:
        return 0
    if not args.no_plot:
        print(f"lsr-bench: summary in {write_summary(args.out)}", file=sys.stderr)
    print("\n" + format_run_table(all_rows))
    ship = format_ship_report(all_rows)
    if ship:
        print("\n" + ship)
    _print_busy_note(all_rows)
    return 0


def _sources(path: Path) -> list[tuple[str, list[dict], dict]]:
    """(label, rows, metadata) of a run: one, or one per machine of a merged run."""
    rows, metadata = load(path)
    if not merge.is_merged(rows, metadata):
        return [(str(path), rows, metadata)]
    return [(f"{path}: {name}", named, own) for name, named, own in merge.by_machine(rows, metadata, path)]


def cmd_plot(args) -> int:
    inputs = [Path(source) for source in args.results]
    # Everything is read and checked before the first chart is written.
    runs = [(path, *load(path)) for path in inputs]
    sources = [source for path in inputs for source in _sources(path)]
    if len(inputs) > 1 and not shared_shapes(sources):
        raise UsageError("no (dtype, N, C) was measured forward+backward in every input: nothing to compare")
    out = Path(args.out) if args.out else None
    folders = chart_folders(inputs, out)
    side = (out or Path(".")) if len(inputs) > 1 else None
    for folder in [*folders, *([side] if side else [])]:
        check_writable(folder, "--out" if out else "chart folder")
    for (_, rows, metadata), folder in zip(runs, folders, strict=True):
        skipped: list[str] = []
        print("\n".join(str(p) for p in plot_run(rows, metadata, folder, skipped)))
        for line in skipped:
            print(f"lsr-bench: chart {line}", file=sys.stderr)
    if side:
        for (label, _, metadata), (other, _, other_metadata) in zip(sources, sources[1:], strict=False):
            differ = machine_difference(metadata, other_metadata)
            if differ:
                print(f"lsr-bench: note: {label} and {other} were {differ}", file=sys.stderr)
        print(plot_side_by_side(sources, side / "side_by_side.png"))
    if args.summary:
        print(write_summary(Path(args.summary)))
    return 0


def _is_run(path: Path) -> bool:
    return path.is_file() or (path / RESULTS_FILE).exists()


def _runs_in(path: Path) -> dict[str, Path]:
    """The runs `path` names, by device folder: itself when it is a run, else the sub-folders of a
    results root (OUT/<device>/) that hold one."""
    if _is_run(path):
        return {(path.parent if path.name == RESULTS_FILE else path).name: path}
    runs = {p.parent.name: p.parent for p in sorted(path.glob(f"*/{RESULTS_FILE}"))}
    if not runs:
        raise FileNotFoundError(f"no results file at {path} nor in its sub-folders")
    return runs


def comparison_pairs(old: Path, new: Path) -> list[tuple[str, Path, Path]]:
    """(device folder, old run, new run): the two runs themselves, or, where either is a results
    root, the device folders of one matched by name with the other's."""
    before, after = _runs_in(old), _runs_in(new)
    if _is_run(old) and _is_run(new):
        return [("", old, new)]
    names = [name for name in before if name in after]
    if not names:
        raise UsageError(
            f"no device folder in both: {old} has {', '.join(before)}; {new} has {', '.join(after)}"
        )
    for name in sorted(set(before) ^ set(after)):
        print(f"lsr-bench: {name} is in only one of the two; not compared", file=sys.stderr)
    return [(name, before[name], after[name]) for name in names]


def _rows_of(path: Path, machine: str | None) -> list[dict]:
    """A run's rows, those of `machine` where one is named; a run of several machines needs one."""
    rows, metadata = load(path)
    if machine:
        return merge.rows_of(rows, metadata, machine, path)
    if merge.is_merged(rows, metadata):
        names = [name for name, _, _ in merge.by_machine(rows, metadata, path)]
        if len(names) > 1:
            raise UsageError(
                f"{path} holds rows of machines {', '.join(names)}: choose with --machine (and --against-machine)"
            )
    return rows


def cmd_compare(args) -> int:
    if args.new is None and not (args.machine and args.against_machine):
        raise UsageError(
            "compare needs a new run, or --machine and --against-machine to compare two machines"
        )
    old_machine = args.against_machine or args.machine
    if old_machine or args.machine:
        print(f"new: {args.machine or 'the run'}, old: {old_machine or 'the run'}")
    for name, old_path, new_path in comparison_pairs(Path(args.old), Path(args.new or args.old)):
        if name:
            print(f"\n{name}: {old_path} -> {new_path}")
        old, new = _rows_of(old_path, old_machine), _rows_of(new_path, args.machine)
        if not (old_machine or args.machine):  # two machines of a merged run say so above
            differ = machine_difference(load(old_path)[1], load(new_path)[1])
            if differ:
                print(f"note: {old_path} and {new_path} were {differ}")
        entries = compare(old, new, min_change=args.min_change, ignore_busy=args.ignore_busy)
        print(format_comparison(entries))
    return 0


def cmd_merge(args) -> int:
    inputs, out = [Path(path) for path in args.runs], Path(args.out)
    if all(_is_run(path) for path in inputs):
        groups = {"": inputs}
    else:  # results roots: device folder by device folder, as compare does
        groups: dict[str, list[Path]] = {}
        for path in inputs:
            for name, run in _runs_in(path).items():
                groups.setdefault(name, []).append(run)
    for name, runs in groups.items():
        target = out / name if name else out
        counts = merge.merge_runs(runs, target)
        rows = ", ".join(f"{n} rows of {machine}" for machine, n in counts.items())
        print(f"{target / RESULTS_FILE}: {rows}")
    return 0
