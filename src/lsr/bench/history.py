"""asv's history of lsr-bench: the machine it is recorded under, and a chart drawn from its JSON.

    python -m lsr.bench.history machine                              # register this host with asv
    python -m lsr.bench.history chart results/asv --out results/history

`machine` names the host by `environment.machine_name()` (CPU family, logical cores, vector ISA,
e.g. "epyc-2c-avx2"), so that hosts of one kind and ISA share a history line and an ISA change is a
new line, never a regression; asv's machine file keeps the CPU model, cores and memory beside it
(torch's version is in each result's parameters, from asv.conf.json's matrix).

`chart` reads asv's results directory (results/asv/<machine>/<commit>-<env>.json, one file per
commit) and draws, per machine and benchmark size, forward+backward time and peak allocated bytes of
each implementation over commits (short hash and date on the axis), with the floor's time.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# asv's names for what the suite (benchmarks/asv_suite/bench_losses.py) records.
TIME = "bench_losses.Loss.time_pass"
PEAK = "bench_losses.Loss.track_peak_bytes"
FLOOR_TIME = "bench_losses.Floor.time_exp"
CHART_PASS = "forward+backward"  # what a training step runs


def machine_arguments() -> list[str]:
    """`asv machine` arguments that describe this host, non-interactively."""
    import psutil

    from lsr.bench.measure.machine import cpu_model, machine_name, vector_isa

    cores = psutil.cpu_count(logical=True)
    return [
        "machine",
        "--machine",
        machine_name(),
        "--os",
        platform.platform(),
        "--arch",
        platform.machine(),
        "--cpu",
        f"{cpu_model()} ({vector_isa()}, {cores} logical cores)",
        "--num_cpu",
        str(cores),
        "--ram",
        f"{psutil.virtual_memory().total // 2**30} GiB",
        "--yes",
    ]


def register_machine(asv: str = "asv") -> str:
    """Run `asv machine` for this host; its name, for `asv run --machine NAME`."""
    arguments = machine_arguments()
    subprocess.run([asv, *arguments], check=True, stdout=subprocess.DEVNULL)
    return arguments[arguments.index("--machine") + 1]


# --- reading asv's results --------------------------------------------------------------------------


@dataclass
class Commit:
    """One commit's results on one machine: {benchmark: {parameter tuple: value}}; `date` is the
    commit's date, as asv records it."""

    hash: str
    date: datetime.datetime
    values: dict[str, dict[tuple, float]] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)  # asv's env params (torch, python)

    @property
    def label(self) -> str:
        return f"{self.hash[:7]} {self.date:%m-%d %H:%M}"


def _unquote(param: str) -> str:
    """asv stores a string parameter as its repr ("'native'"): the plain string."""
    return param[1:-1] if len(param) >= 2 and param[0] == param[-1] and param[0] in "'\"" else param


def _values(result: list | None, params: list[list[str]]) -> dict[tuple, float]:
    """{parameter tuple: value} of one benchmark in one asv result file; a failed, skipped or
    missing case (null or NaN) is left out."""
    if result is None:
        return {}
    if not params:
        result, combos = [result[0] if isinstance(result, list) else result], [()]
    else:
        combos = list(itertools.product(*params))
    out = {}
    for combo, value in zip(combos, result, strict=False):
        if isinstance(value, int | float) and not math.isnan(value):
            out[tuple(_unquote(p) for p in combo)] = float(value)
    return out


def load_history(results_dir: str | Path) -> dict[str, list[Commit]]:
    """{machine: its commits, oldest first by commit date} from an asv results directory (asv's
    result format, version 2: `result_columns` name the columns of each benchmark's entry)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no asv results directory (asv.conf.json's results_dir)")
    machines: dict[str, list[Commit]] = {}
    for machine_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        commits: dict[str, Commit] = {}
        for path in sorted(machine_dir.glob("*.json")):
            data = json.loads(path.read_text())
            if path.name == "machine.json" or "commit_hash" not in data or data.get("date") is None:
                continue
            date = datetime.datetime.fromtimestamp(data["date"] / 1000, tz=datetime.timezone.utc)
            commit = commits.setdefault(data["commit_hash"], Commit(data["commit_hash"], date))
            commit.environment.update({k: str(v) for k, v in data.get("params", {}).items()})
            columns = data.get("result_columns", ["result", "params"])
            for name, entry in data.get("results", {}).items():
                row = dict(zip(columns, entry, strict=False))
                commit.values.setdefault(name, {}).update(_values(row.get("result"), row.get("params") or []))
        if commits:
            machines[machine_dir.name] = sorted(commits.values(), key=lambda c: (c.date, c.hash))
    return machines


def _machine_info(results_dir: Path, machine: str) -> dict:
    path = results_dir / machine / "machine.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --- the chart ----------------------------------------------------------------------------------------


def _sizes(commits: Sequence[Commit]) -> list[tuple[int, int]]:
    """The (batch, classes) sizes with a forward+backward result at some commit, smallest first."""
    sizes = {
        (int(key[2]), int(key[3]))
        for commit in commits
        for key in commit.values.get(TIME, {})
        if key[1] == CHART_PASS
    }
    return sorted(sizes, key=lambda s: (s[0] * s[1], s))


def _implementations(commits: Sequence[Commit]) -> list[str]:
    """The implementations with any result, in the suite's order (first seen)."""
    names: dict[str, None] = {}
    for commit in commits:
        for benchmark in (TIME, PEAK):
            for key in commit.values.get(benchmark, {}):
                names.setdefault(key[0])
    return list(names)


def _series(commits: Sequence[Commit], benchmark: str, key: tuple) -> list[float]:
    """One value per commit, NaN where the commit has none (a gap in the line)."""
    return [commit.values.get(benchmark, {}).get(key, math.nan) for commit in commits]


def _two_and_five(value: float, _position) -> str:
    """A log axis's minor tick label, for 2 and 5 times a power of ten only (the others unlabelled)."""
    leading = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6) if value > 0 else 0
    return f"{value:g}" if leading in (2, 5) else ""


def draw(results_dir: str | Path, out: str | Path) -> list[Path]:
    """One chart per machine of asv's results: forward+backward time (with the floor) and peak
    allocated bytes of each implementation over commits, a column per size. Returns the PNGs."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from lsr.bench.report import style
    from lsr.bench.report.tables import format_bytes

    results_dir, out = Path(results_dir), Path(out)
    written = []
    for machine, commits in load_history(results_dir).items():
        sizes = _sizes(commits)
        if not sizes:
            continue
        names = _implementations(commits)
        x = list(range(len(commits)))
        with style.context():
            fig = style.figure(max(8.0, 3.2 * len(sizes) + 0.35 * len(commits)), 7.5)
            axes = fig.subplots(2, len(sizes), sharex=True, squeeze=False)
            for column, (batch, classes) in enumerate(sizes):
                time_ax, bytes_ax = axes[0][column], axes[1][column]
                for name in names:
                    key = (name, CHART_PASS, str(batch), str(classes))
                    times = [v * 1e3 for v in _series(commits, TIME, key)]
                    if not all(math.isnan(v) for v in times):
                        time_ax.plot(x, times, **style.line_style(name))
                    peaks = _series(commits, PEAK, key)
                    if not all(math.isnan(v) for v in peaks):
                        bytes_ax.plot(x, peaks, **style.line_style(name))
                floor = [v * 1e3 for v in _series(commits, FLOOR_TIME, (str(batch), str(classes)))]
                if not all(math.isnan(v) for v in floor):
                    time_ax.plot(x, floor, **style.line_style("floor"))
                time_ax.set_title(f"N {batch} × C {classes}")
                # Log scales (the implementations differ tenfold), labelled in plain numbers.
                time_ax.set_yscale("log")
                time_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                time_ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
                bytes_ax.set_yscale("log", base=2)
                bytes_ax.yaxis.set_major_locator(LogLocator(base=2))
                bytes_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
                bytes_ax.yaxis.set_minor_formatter(NullFormatter())
                for ax in (time_ax, bytes_ax):
                    ax.grid(True, which="major")
                bytes_ax.set_xticks(x, [c.label for c in commits], rotation=90, fontsize=7.5)
            axes[0][0].set_ylabel(f"{CHART_PASS} time (ms, log)")
            axes[1][0].set_ylabel("peak bytes allocated")
            info = _machine_info(results_dir, machine)
            torch_version = next((c.environment.get("torch") for c in reversed(commits)), None)
            details = " · ".join(
                p for p in (machine, info.get("cpu"), f"torch {torch_version}" if torch_version else "") if p
            )
            fig.suptitle(
                f"History over commits (asv, float32, smoothing 0.1): {CHART_PASS} time and peak bytes\n"
                f"{details} · {len(commits)} commits, oldest left"
            )
            style.legend_below(fig, columns=6)
            written.append(style.save(fig, out / f"{machine}_cpu_float32.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsr.bench.history", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("machine", help="register this host with `asv machine`; prints its name")
    chart = commands.add_parser("chart", help="draw the history chart from asv's results")
    chart.add_argument("results", nargs="?", default="results/asv", help="asv's results_dir")
    chart.add_argument("--out", default="results/history", help="directory for the PNGs")
    args = parser.parse_args(argv)
    if args.command == "machine":
        print(register_machine())
        return 0
    written = draw(args.results, args.out)
    if not written:
        print(f"{args.results}: no forward+backward results to draw")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
