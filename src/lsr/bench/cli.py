"""`lsr-bench` (also `python -m lsr.bench`): run a sweep, draw its charts, compare two runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import lsr
from lsr.bench import grid as grids
from lsr.bench.compare import compare, format_comparison
from lsr.bench.plot import plot_run, plot_side_by_side
from lsr.bench.report import write_summary
from lsr.bench.results import FLOOR, PASSES, SchemaError, load
from lsr.bench.runner import run_sweep
from lsr.bench.tables import format_table
from lsr.types import DEVICES, DTYPES


def _grids_from_args(args) -> list[grids.Grid]:
    devices = args.device or grids.present_devices()
    missing = [d for d in devices if d not in grids.present_devices()]
    if missing:
        raise SystemExit(f"lsr-bench: device {', '.join(missing)} is not present on this machine")
    chosen = []
    for base in grids.preset(args.preset, devices):
        device = base.devices[0]
        if args.impl:
            cannot = [name for name in args.impl if not lsr.get(name).runs_on(device)]
            if cannot:
                raise SystemExit(
                    f"lsr-bench: {', '.join(cannot)} cannot run on {device} here (see lsr.REGISTRY)"
                )
        grid = grids.Grid(
            implementations=args.impl or [n for n in base.implementations if lsr.get(n).runs_on(device)],
            devices=base.devices,
            dtypes=args.dtype or base.dtypes,
            batches=args.batch or base.batches,
            classes=args.classes or base.classes,
            smoothings=args.smoothing or base.smoothings,
            passes=args.pass_ or base.passes,
        )
        if not any(not case.is_floor for case in grid.cases()):
            raise SystemExit(f"lsr-bench: no implementation has a case on {device} with these options")
        chosen.append(grid)
    return chosen


def print_table(rows: list[dict]) -> None:
    """Medians, one line per case, with forward+backward's ratio to the floor and the peak memory."""
    floors = {
        (r["device"], r["dtype"], r["batch"], r["classes"]): r
        for r in rows
        if r["implementation"] == FLOOR and r["status"] == "ok"
    }
    lines = []
    for r in rows:
        floor = floors.get((r["device"], r["dtype"], r["batch"], r["classes"]))
        ok = r["status"] == "ok"
        ratio = ok and floor and r["pass"] == "forward+backward"
        lines.append(
            [
                r["implementation"],
                r["device"],
                r["dtype"],
                r["batch"],
                r["classes"],
                r["pass"],
                f"{r['median_s'] * 1e3:.3f}" if ok else "",
                f"{r['iqr_s'] * 1e3:.3f}" if ok else "",
                f"{r['median_s'] / floor['median_s']:.2f}" if ratio else "",
                f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else "",
                r["status"] if not r["message"] else f"{r['status']}: {r['message'][:60]}",
            ]
        )
    headers = [
        "implementation",
        "device",
        "dtype",
        "N",
        "C",
        "pass",
        "median ms",
        "IQR ms",
        "x floor",
        "peak MiB",
    ]
    print("\n" + format_table([*headers, "status"], lines, align="lllrrlrrrrl"))


def cmd_run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or ("results" if args.preset == "full" else "results/quick")
    all_rows = []
    for g in _grids_from_args(args):
        device = g.devices[0]
        out_dir = Path(args.out) / device
        cases = list(g.cases())
        print(f"lsr-bench: {len(cases)} cases on {device} -> {out_dir}/", file=sys.stderr)
        rows = run_sweep(
            cases,
            out_dir,
            resume=args.resume,
            preset=args.preset,
            logit_std=args.logit_std,
            min_time=args.min_time,
            progress=not args.no_progress,
        )
        all_rows += rows
        if not args.no_plot:
            rows, metadata = load(out_dir)
            plot_run(rows, metadata, out_dir)
    if not args.no_plot:
        print(f"lsr-bench: summary in {write_summary(Path(args.out))}", file=sys.stderr)
    print_table(all_rows)
    return 0


def cmd_plot(args) -> int:
    sources = []
    for source in args.results:
        rows, metadata = load(source)
        path = Path(source)
        out_dir = (
            Path(args.out)
            if args.out and len(args.results) == 1
            else (path if path.is_dir() else path.parent)
        )
        written = plot_run(rows, metadata, out_dir)
        print("\n".join(str(p) for p in written))
        sources.append((str(source), rows, metadata))
    if len(sources) > 1:
        out = Path(args.out or ".") / "side_by_side.png"
        print(plot_side_by_side(sources, out))
    if args.summary:
        print(write_summary(Path(args.summary)))
    return 0


def cmd_compare(args) -> int:
    old, _ = load(args.old)
    new, _ = load(args.new)
    entries = compare(old, new, min_change=args.min_change)
    print(format_comparison(entries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsr-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="measure a sweep (default: the quick preset on every present device)")
    run.add_argument("--preset", choices=list(grids.PRESETS), default="quick")
    run.add_argument(
        "--impl", nargs="+", choices=list(lsr.REGISTRY), help="implementations (default: all that run)"
    )
    run.add_argument("--device", nargs="+", choices=DEVICES)
    run.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    run.add_argument("--batch", nargs="+", type=int)
    run.add_argument("--classes", nargs="+", type=int)
    run.add_argument("--smoothing", nargs="+", type=float)
    run.add_argument("--pass", dest="pass_", nargs="+", choices=PASSES)
    run.add_argument(
        "--out",
        help="results root; each device writes to OUT/<device>/ (default: results/ for full, results/quick/ otherwise)",
    )
    run.add_argument("--resume", action="store_true", help="keep rows already in OUT and skip their cases")
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    run.add_argument("--logit-std", type=float, default=2.0, help="standard deviation of the random logits")
    run.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per case, at least")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=cmd_run)

    plot = sub.add_parser("plot", help="charts from result directories, results.csv or pytest-benchmark JSON")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--out", help="output directory (default: beside each input)")
    plot.add_argument(
        "--summary", metavar="ROOT", help="also regenerate ROOT/README.md over ROOT/*/results.csv"
    )
    plot.set_defaults(func=cmd_plot)

    cmp = sub.add_parser("compare", help="two runs side by side, with changes beyond the noise flagged")
    cmp.add_argument("old")
    cmp.add_argument("new")
    cmp.add_argument("--min-change", type=float, default=0.05)
    cmp.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SchemaError, FileNotFoundError, ValueError) as e:
        print(f"lsr-bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
