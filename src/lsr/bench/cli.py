"""`lsr-bench` (also `python -m lsr.bench`): run a sweep, draw its charts, compare two runs, merge
the runs of several machines.

Arguments that cannot be run are refused before anything is measured, with one line on stderr and
exit status 2. Ctrl-C ends a run with one line and status 130; the rows measured so far stay on
disk for `--resume`. Launched by torchrun with several ranks, `run` shares its cases among them
(`lsr.bench.shard`) and rank 0 alone prints the tables and draws the charts.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lsr
from lsr.bench import grid as grids
from lsr.bench import measure, merge
from lsr.bench.arguments import (
    AT_LEAST_ONE,
    EXIT_USAGE,
    FORMAT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SWITCH,
    THREADS,
    Parser,
    Plan,
    UsageError,
    check_writable,
    plans,
)
from lsr.bench.compare import compare, format_comparison
from lsr.bench.plot import chart_folders, plot_run
from lsr.bench.report import format_run_table, write_summary
from lsr.bench.results import PASSES, RESULTS_FILE, Case, SchemaError, case_key, load, read_rows
from lsr.bench.runner import (
    SHARED_DEVICES,
    BusyMachineWarning,
    SweepInterrupted,
    SweepLocked,
    busy_rows,
    run_sweep,
)
from lsr.bench.shard import Shard, share
from lsr.bench.ship import format_ship_report
from lsr.bench.side_by_side import plot_side_by_side, shared_shapes
from lsr.types import DEVICES, DTYPES

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


def _warn_busy(rows: list[dict]) -> None:
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
    present = grids.present_devices()
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


def _run(args, shard: Shard | None) -> int:
    args.out = Path(args.out or ("results" if args.preset == "full" else "results/quick"))
    if shard is not None and not args.device:
        args.device = _sharded_devices(shard)
    planned = plans(args)
    if shard is not None:
        shard.require_same([(p.device, [c.key() for c in p.cases]) for p in planned], "the devices and cases")
    for plan in planned:
        check_writable(args.out / plan.device, "--out")
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
            plot_run(*load(out_dir), out_dir)
    if not lead:
        return 0
    if not args.no_plot:
        print(f"lsr-bench: summary in {write_summary(args.out)}", file=sys.stderr)
    print("\n" + format_run_table(all_rows))
    ship = format_ship_report(all_rows)
    if ship:
        print("\n" + ship)
    _warn_busy(all_rows)
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
        print("\n".join(str(p) for p in plot_run(rows, metadata, folder)))
    if side:
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


def _run_parser(sub) -> None:
    run = sub.add_parser(
        "run", help="measure a sweep (default: the quick preset on every present device)", **FORMAT
    )
    run.add_argument(
        "--preset",
        choices=list(grids.PRESETS),
        default="quick",
        help="the grids to start from, a few per device; each option below replaces its axis in every one",
    )
    run.add_argument(
        "--impl", nargs="+", choices=list(lsr.REGISTRY), help="implementations (default: all that run)"
    )
    run.add_argument("--device", nargs="+", choices=DEVICES, help="devices (default: every present one)")
    axes = "(default: the preset's)"
    run.add_argument("--dtype", nargs="+", choices=list(DTYPES), help=f"logits dtypes {axes}")
    run.add_argument("--batch", nargs="+", type=AT_LEAST_ONE, help=f"batch sizes N, each >= 1 {axes}")
    run.add_argument("--classes", nargs="+", type=AT_LEAST_ONE, help=f"class counts C, each >= 1 {axes}")
    run.add_argument("--smoothing", nargs="+", type=PROBABILITY, help=f"label smoothing in [0, 1] {axes}")
    run.add_argument("--pass", dest="pass_", nargs="+", choices=PASSES, help=f"passes timed {axes}")
    run.add_argument(
        "--ignore-fraction",
        nargs="+",
        type=FRACTION,
        metavar="F",
        help=f"fractions of the targets set to ignore_index (padding), each in [0, 1) {axes}",
    )
    run.add_argument(
        "--weighted", nargs="+", choices=list(SWITCH), help=f"class weights off and/or on {axes}"
    )
    run.add_argument(
        "--out",
        help="results root; each device writes to OUT/<device>/ (default: results/ for full, results/quick/ otherwise)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows in OUT and measure only this grid's cases not yet measured ok",
    )
    run.add_argument(
        "--resume-mixed",
        action="store_true",
        help="--resume even where kept rows were measured with other settings (--min-time, "
        "--logit-std), which --resume refuses; the file then mixes rows measured two ways, each "
        "row recording its settings",
    )
    run.add_argument(
        "--isolate",
        choices=["case", "size"],
        help="measure each case, or each size's cases, in a child process, so that a case that runs "
        "out of memory or crashes costs its row, not the sweep (default: all in this process)",
    )
    run.add_argument(
        "--threads",
        nargs="+",
        type=THREADS,
        metavar="T",
        help=f"torch intra-op thread counts, each >= 1 or 'all' (torch's own, every core) {axes}",
    )
    run.add_argument(
        "--l2-flush",
        choices=list(SWITCH),
        default="on",
        help="CUDA: flush L2 before each timed call, outside the timed events (default: on; recorded "
        "in metadata.json); off measures calls that find their inputs in a warm L2",
    )
    run.add_argument(
        "--logit-std", type=POSITIVE, default=2.0, help="standard deviation of the random logits"
    )
    run.add_argument(
        "--min-time", type=POSITIVE, default=0.5, help="seconds of timed runs per case, at least"
    )
    run.add_argument("--no-plot", action="store_true", help="skip the charts and the summary")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lsr-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)

    plot = sub.add_parser(
        "plot", help="charts from result directories, results.csv or pytest-benchmark JSON", **FORMAT
    )
    plot.add_argument("results", nargs="+", help="result directories, results.csv or pytest-benchmark JSON")
    plot.add_argument(
        "--out",
        help="output directory; with several inputs each gets a sub-folder named after its path, and "
        "the side-by-side chart goes in OUT (default: charts beside each input, side_by_side.png here)",
    )
    plot.add_argument(
        "--summary",
        metavar="ROOT",
        help="also regenerate ROOT/README.md over ROOT/*/results.csv (default: no)",
    )
    plot.set_defaults(func=cmd_plot)

    cmp = sub.add_parser("compare", help="two runs side by side, changes beyond the noise flagged", **FORMAT)
    cmp.add_argument("old", help="a run (OUT/<device>, results.csv) or a results root (OUT)")
    cmp.add_argument(
        "new",
        nargs="?",
        help="the same for the new run; roots are compared device folder by device folder (default: "
        "old itself, to compare two machines of a merged run)",
    )
    cmp.add_argument(
        "--machine",
        help="compare this machine's rows (a merged run's, see merge); needed where a run has several "
        "(default: the run's one machine)",
    )
    cmp.add_argument(
        "--against-machine",
        metavar="MACHINE",
        help="take old's rows from this machine: new / old is then --machine's time / MACHINE's "
        "(default: --machine)",
    )
    cmp.add_argument("--min-change", type=NON_NEGATIVE, default=0.05, help="smallest relative change flagged")
    cmp.add_argument(
        "--ignore-busy", action="store_true", help="leave out rows measured while the machine was busy"
    )
    cmp.set_defaults(func=cmd_compare)

    mrg = sub.add_parser(
        "merge",
        help="the runs of several machines in one directory, each row tagged with its machine",
        **FORMAT,
    )
    mrg.add_argument(
        "runs",
        nargs="+",
        help="runs (OUT/<device>, results.csv) or results roots (OUT, merged device folder by device folder)",
    )
    mrg.add_argument(
        "--out",
        required=True,
        help="the merged directory (required, no default): results.csv with every row, metadata.json "
        "with each machine's metadata under machines",
    )
    mrg.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a refusal already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except SweepLocked as e:  # first: it may derive from one of the errors below
        print(f"lsr-bench: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except (UsageError, SchemaError, OSError, ValueError) as e:
        print(f"lsr-bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lsr-bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
