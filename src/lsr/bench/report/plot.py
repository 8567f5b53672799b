"""The charts of a run, drawn with matplotlib's object-oriented API (no pyplot, no backend switch).

`plot_run` writes the `CHARTS` (drawn by `lsr.bench.report.charts`) for every dtype of a run, per
variant (device, smoothing, ignore fraction, weighting) where it has several, and per machine where
a merged run has several; `chart_folders` says where each run's charts go (several runs, or
machines, side by side: `lsr.bench.report.side_by_side`). Rows come from `lsr.bench.data.load` and
are selected by `lsr.bench.report.selection`, as the tables' are; colours, markers, fonts, titles,
legends and resolution come from `lsr.bench.report.style`, so an implementation looks the same in
every chart.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from matplotlib.figure import Figure

from lsr.bench.data import RESULTS_FILE, merge
from lsr.bench.report import charts, head, selection, style
from lsr.bench.report.selection import CHARTS, chart_file, dtypes, ok_rows, variants
from lsr.bench.report.side_by_side import plot_side_by_side, shared_shapes

__all__ = ["CHARTS", "DRAW", "chart_folders", "plot_run"]

Chart = Callable[..., Figure | None]  # (rows, metadata, dtype, *, variant=label) -> a figure, or None


DRAW: dict[str, Chart] = {
    "time_vs_batch": partial(charts.line_grid, quantity=charts.TIME, x_axis="batch"),
    "time_vs_classes": partial(charts.line_grid, quantity=charts.TIME, x_axis="classes"),
    "memory_vs_batch": partial(charts.line_grid, quantity=charts.MEMORY, x_axis="batch"),
    "memory_vs_classes": partial(charts.line_grid, quantity=charts.MEMORY, x_axis="classes"),
    "speedup": charts.speedup_heatmaps,
    "floor_multiple": charts.floor_multiple,
    "bandwidth": charts.bandwidth,
    "thread_scaling": charts.thread_scaling,
}
# Every chart but the threads chart shows the rows at all cores: a case measured at 1 thread too
# appears once there.
ALL_THREADS_CHARTS = ("thread_scaling",)
# Why a chart is not drawn for a run's rows (its function returned None): what it needs
NEEDS = {
    "time_vs_batch": "two or more batch sizes",
    "time_vs_classes": "two or more class counts",
    "memory_vs_batch": "two or more batch sizes with a peak measured",
    "memory_vs_classes": "two or more class counts with a peak measured",
    "speedup": "native (or sparse and dense) measured forward+backward beside another implementation",
    "floor_multiple": "an implementation measured forward+backward beside its floor",
    "bandwidth": "forward+backward rows",
    "thread_scaling": "a size measured at 1 thread and at more (--threads 1 all)",
}
assert tuple(NEEDS) == CHARTS, "every chart says what it needs"
assert tuple(DRAW) == CHARTS, "every chart the summary links is drawn here"


def _name_parts(path: Path) -> tuple[str, ...]:
    """The parts of an input's path that name it: a run folder, or a JSON file without its suffix."""
    path = path.resolve()
    if path.name == RESULTS_FILE:
        path = path.parent
    return (*path.parent.parts[1:], path.stem if path.suffix == ".json" else path.name)


def chart_folders(inputs: list[Path], out: Path | None) -> list[Path]:
    """Where each input's charts go: beside it without --out; OUT for one input; else a folder of
    OUT per input, named by as many trailing parts of its path as tell the inputs apart."""
    if out is None:
        return [path if path.is_dir() else path.parent for path in inputs]
    if len(inputs) == 1:
        return [out]
    parts = [_name_parts(path) for path in inputs]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["_".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return [out / name for name in names]
    return [out / f"{name}_{i}" for i, name in enumerate(names, 1)]  # one input given twice


def plot_run(rows: list[dict], metadata: dict, out_dir: Path, skipped: list[str] | None = None) -> list[Path]:
    """Every chart for one run, per dtype (and per variant where it has several). A merged run of
    several machines (`lsr-bench merge`): each machine's charts in out_dir/<machine>/, and their
    forward+backward times side by side, a column per machine, in out_dir/side_by_side.png.
    `skipped` collects a line per chart the rows cannot make, saying what it needs. Head rows
    (`lsr.heads`) get the head charts (`lsr.bench.report.head`) instead."""
    rows, heads = head.split(rows)
    written = []
    if heads and merge.is_merged(heads, metadata):  # each machine's head charts in its own folder
        for name, named, own in merge.by_machine(heads, metadata):
            written += head.head_charts(named, own, out_dir / name)
    elif heads:
        written = head.head_charts(heads, metadata, out_dir)
    if not rows:
        return written
    if merge.is_merged(rows, metadata):
        machines = merge.by_machine(rows, metadata)
        if len(machines) == 1:
            return written + _plot_machine(*machines[0][1:], out_dir, skipped)
        written += [
            path
            for name, named, own in machines
            for path in _plot_machine(named, own, out_dir / name, skipped)
        ]
        if shared_shapes(machines):
            written.append(plot_side_by_side(machines, out_dir / "side_by_side.png"))
        return written
    return written + _plot_machine(rows, metadata, out_dir, skipped)


def _one_thread_count(rows: list[dict]) -> bool:
    """Whether the implementations' rows (not the floors', which every variant shares) were measured
    at one thread count: the threads chart was not asked for."""
    return len({r.get("threads") for r in rows if not selection.is_floor(r)}) <= 1


def _note_busy(fig: Figure, rows: list[dict]) -> None:
    """Say under the title how many of the chart's rows were timed on a busy machine (the line
    charts draw them hollow); nothing when none was."""
    busy = sum(1 for r in ok_rows(rows) if r.get("busy"))
    if not busy:
        return
    note = f"{busy} rows timed while other processes loaded the machine (hollow markers): their times may be high"
    if fig.get_suptitle():
        fig.suptitle(f"{fig.get_suptitle()}\n{note}")
    else:
        fig.axes[0].set_title(f"{fig.axes[0].get_title()}\n{note}")


def _plot_machine(rows: list[dict], metadata: dict, out_dir: Path, skipped: list[str] | None) -> list[Path]:
    """Every chart for one machine's run; what could not be drawn, and why, into `skipped`."""
    written = []
    with style.context():
        for suffix, label, subset in variants(rows):
            for dtype in dtypes(subset):
                for chart, draw in DRAW.items():
                    shown = subset if chart in ALL_THREADS_CHARTS else selection.at_all_cores(subset)
                    fig = draw(shown, metadata, dtype, variant=label)
                    if fig is not None:
                        _note_busy(fig, [r for r in shown if r["dtype"] == dtype])
                        written.append(style.save(fig, out_dir / chart_file(chart, dtype, suffix)))
                    elif skipped is not None and not (
                        chart in ALL_THREADS_CHARTS and _one_thread_count(subset)
                    ):
                        where = f"{dtype}{', ' + label if label else ''}"
                        skipped.append(f"{chart} ({where}): not drawn, it needs {NEEDS[chart]}")
    return written
