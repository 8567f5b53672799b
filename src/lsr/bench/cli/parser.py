"""The argparse tree of `lsr-bench` and its entry point: every option states its default, a refusal
is one line (exit 2), a locked output folder exit 75, Ctrl-C exit 130."""

from __future__ import annotations

import argparse
import sys

import lsr
import lsr.heads
from lsr.bench.cli.arguments import (
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
    UsageError,
)
from lsr.bench.cli.commands import EXIT_INTERRUPTED, EXIT_LOCKED, cmd_compare, cmd_merge, cmd_plot, cmd_run
from lsr.bench.data import PASSES, SchemaError
from lsr.bench.sweep import PRESETS, SweepLocked
from lsr.types import DEVICES, DTYPES

DESCRIPTION = """`lsr-bench` (also `python -m lsr.bench`): run a sweep, draw its charts, compare two runs, merge
the runs of several machines.

Arguments that cannot be run are refused before anything is measured, with one line on stderr and
exit status 2. Ctrl-C ends a run with one line and status 130; the rows measured so far stay on
disk for `--resume`. Launched by torchrun with several ranks, `run` shares its cases among them
(`lsr.bench.sweep.shard`) and rank 0 alone prints the tables and draws the charts.
"""


def _run_parser(sub) -> None:
    run = sub.add_parser(
        "run", help="measure a sweep (default: the quick preset on every present device)", **FORMAT
    )
    run.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="quick",
        help="the grids to start from, a few per device; each option below replaces its axis in every one",
    )
    run.add_argument(
        "--impl",
        nargs="+",
        choices=[*lsr.REGISTRY, *lsr.heads.HEAD_REGISTRY],
        help="implementations (default: all that run; of a head preset, every head loss)",
    )
    run.add_argument("--device", nargs="+", choices=DEVICES, help="devices (default: every present one)")
    axes = "(default: the preset's)"
    run.add_argument("--dtype", nargs="+", choices=list(DTYPES), help=f"logits dtypes {axes}")
    run.add_argument("--batch", nargs="+", type=AT_LEAST_ONE, help=f"batch sizes N, each >= 1 {axes}")
    run.add_argument("--classes", nargs="+", type=AT_LEAST_ONE, help=f"class counts C, each >= 1 {axes}")
    run.add_argument(
        "--hidden",
        nargs="+",
        type=AT_LEAST_ONE,
        help=f"a head preset's hidden sizes H (--batch: its tokens, --classes: its vocabulary) {axes}",
    )
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
        help="results root; each device writes to OUT/<device>/ (default: results/ for full, results/head/ for head, results/quick/ otherwise)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows in OUT and measure only this grid's cases not yet measured ok",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results in OUT even where they were measured on another machine, at another "
        "commit or with another grid (refused otherwise, naming what is there)",
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
    parser = Parser(prog="lsr-bench", description=DESCRIPTION)
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
