"""The charts of a run, drawn with matplotlib's object-oriented API (no pyplot, no backend switch).

`plot_run` writes the `CHARTS` for every dtype of a run (and per device and smoothing where it has
several); `plot_side_by_side` puts several runs next to each other, at the (dtype, N, C) they all
measured; `chart_folders` says where each run's charts go. Rows come from `lsr.bench.results.load`
and are selected by `lsr.bench.report`; colours, markers, fonts, titles and resolution come from
`lsr.bench.style`, so an implementation looks the same in every chart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lsr.bench import style
from lsr.bench.report import (
    CHARTS,
    FWD_BWD,
    chart_file,
    dtypes,
    implementations,
    index_rows,
    ok_rows,
    variants,
)
from lsr.bench.results import FLOOR, PASSES, RESULTS_FILE

__all__ = ["CHARTS", "chart_folders", "plot_run", "plot_side_by_side", "shared_shapes", "side_by_side_figure"]

GRADIENT = "gradient"  # the reference line of the memory charts: N·C·itemsize bytes


@dataclass(frozen=True)
class Quantity:
    """What a line chart plots against a size: the measured value of a row and its reference line."""

    title: str
    ylabel: str
    value: Callable[[dict], float | None]
    reference: str  # FLOOR: the floor's own times; GRADIENT: the gradient's size in bytes


TIME = Quantity("time", "median time (s)", lambda r: r["median_s"], FLOOR)
MEMORY = Quantity(
    "peak memory", "peak allocated above inputs (bytes)", lambda r: r["peak_bytes"] or None, GRADIENT
)
Chart = Callable[[list[dict], dict, str], Figure | None]


def _log_axes(ax: Axes, x_base: int = 10) -> None:
    """Log-log axes with a light grid at major and minor ticks."""
    ax.set_xscale("log", base=x_base)
    ax.set_yscale("log")
    ax.grid(True, which="both")


def _legend_below(fig: Figure, columns: int) -> None:
    """One legend under the panels, each label once, in the order the panels first show it, in rows
    of at most `columns` entries and as even as they can be."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:
        return
    rows = math.ceil(len(entries) / columns)
    fig.legend(
        list(entries.values()),
        list(entries),
        loc="outside lower center",
        ncol=math.ceil(len(entries) / rows),
        frameon=False,
    )


def _itemsize(rows: list[dict], dtype: str) -> float:
    """Bytes per logit of that dtype, from a row's logits_bytes (4 if the run has none)."""
    for r in rows:
        if r["dtype"] == dtype:
            return r["logits_bytes"] / (r["batch"] * r["classes"])
    return 4


def _line_panel(
    ax: Axes, rows: list[dict], dtype: str, quantity: Quantity, pass_: str, x_axis: str, panel: int
) -> None:
    """One panel: a line per implementation (and the reference) against x_axis, the other size fixed."""
    panel_axis = "classes" if x_axis == "batch" else "batch"
    index = index_rows(rows)
    xs = sorted({r[x_axis] for r in ok_rows(rows) if r["dtype"] == dtype})
    names = implementations(rows) + ([FLOOR] if quantity.reference == FLOOR else [])
    for name in names:
        key_pass = FWD_BWD if name == FLOOR else pass_  # the floor is measured once, as its reference
        points = []
        for x in xs:
            size = {x_axis: x, panel_axis: panel}
            row = index.get((name, key_pass, dtype, size["batch"], size["classes"]))
            if row is not None and quantity.value(row) is not None:
                points.append((x, quantity.value(row)))
        if points:
            ax.plot(*zip(*points, strict=True), **style.line_style(name))
    if quantity.reference == GRADIENT:
        grads = [x * panel * _itemsize(rows, dtype) for x in xs]
        ax.plot(xs, grads, **style.REFERENCE, label="gradient bytes (N·C·itemsize)")
    _log_axes(ax, x_base=2 if x_axis == "batch" else 10)
    ax.set_title(f"{pass_}, {'C' if panel_axis == 'classes' else 'N'} = {panel}")


def _line_grid(
    rows: list[dict], metadata: dict, dtype: str, quantity: Quantity, x_axis: str
) -> Figure | None:
    """Rows of panels = passes, columns = values of the other size axis; a line per implementation."""
    panel_axis = "classes" if x_axis == "batch" else "batch"
    panels = sorted({r[panel_axis] for r in ok_rows(rows) if r["dtype"] == dtype})
    if not panels:
        return None
    fig = style.figure(3.6 * len(panels) + 1, 3.0 * len(PASSES) + 1.4)
    axes = fig.subplots(len(PASSES), len(panels), squeeze=False)
    for i, pass_ in enumerate(PASSES):
        for j, panel in enumerate(panels):
            _line_panel(axes[i][j], rows, dtype, quantity, pass_, x_axis, panel)
        axes[i][0].set_ylabel(quantity.ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("batch size N" if x_axis == "batch" else "classes C")
    _legend_below(fig, columns=2 * len(panels) + 1)  # as many as fit under the panels
    fig.suptitle(style.title(f"{quantity.title} vs {x_axis}", metadata, dtype))
    return fig


def _speedup_grid(
    index: dict, pair: tuple[str, str], dtype: str, batches: list[int], classes: list[int]
) -> list[list[float]]:
    """time(second) / time(first) at each (N, C), fwd+bwd; NaN where either was not measured."""
    fast, slow = pair
    grid = [[math.nan] * len(classes) for _ in batches]
    for i, n in enumerate(batches):
        for j, c in enumerate(classes):
            a, b = index.get((fast, FWD_BWD, dtype, n, c)), index.get((slow, FWD_BWD, dtype, n, c))
            if a and b:
                grid[i][j] = b["median_s"] / a["median_s"]
    return grid


def _speedup_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """sparse vs dense, then every implementation vs native (those the run has)."""
    names = implementations(rows)
    pairs = [("sparse", "dense")] if {"sparse", "dense"} <= set(names) else []
    return pairs + [(name, "native") for name in names if name != "native" and "native" in names]


def _speedup_heatmaps(rows: list[dict], metadata: dict, dtype: str) -> Figure | None:
    """fwd+bwd speedup over the N x C grid: sparse vs dense, and every implementation vs native."""
    pairs = _speedup_pairs(rows)
    batches = sorted({r["batch"] for r in ok_rows(rows) if r["dtype"] == dtype})
    classes = sorted({r["classes"] for r in ok_rows(rows) if r["dtype"] == dtype})
    if not pairs or not batches:
        return None
    cols = min(3, len(pairs))
    panel_rows = math.ceil(len(pairs) / cols)
    fig = style.figure(4.2 * cols + 1.5, (0.5 * len(batches) + 2.4) * panel_rows + 1)
    axes = fig.subplots(panel_rows, cols, squeeze=False)
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    norm = LogNorm(vmin=1 / 8, vmax=8)
    index = index_rows(rows)
    for ax, pair in zip(axes.flat, pairs, strict=False):
        grid = _speedup_grid(index, pair, dtype, batches, classes)
        image = ax.imshow(grid, cmap=style.SPEEDUP_CMAP, norm=norm, origin="lower", aspect="auto")
        for i, line in enumerate(grid):
            for j, speedup in enumerate(line):
                if not math.isnan(speedup):
                    ax.text(j, i, f"{speedup:.2f}×", ha="center", va="center", fontsize=style.ANNOTATION_SIZE)
        ax.set_xticks(range(len(classes)), [str(c) for c in classes])
        ax.set_yticks(range(len(batches)), [str(n) for n in batches])
        ax.set(xlabel="classes C", ylabel="batch size N", title=f"{pair[0]} vs {pair[1]}")
    label = "speedup: time of the second / time of the first"
    bar = fig.colorbar(image, ax=axes.flat[: len(pairs)], shrink=0.8, label=label)
    ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    bar.set_ticks(ticks, labels=[f"{t:g}×" if t >= 1 else f"1/{1 / t:g}×" for t in ticks])
    bar.minorticks_off()
    fig.suptitle(style.title("forward+backward speedup (green: the first is faster)", metadata, dtype))
    return fig


def _floor_multiple(rows: list[dict], metadata: dict, dtype: str) -> Figure | None:
    """fwd+bwd time / floor time against the number of logits N·C, a point per size."""
    index = index_rows(rows)
    fig = style.figure(9, 4.8)
    ax = fig.subplots()
    for name in implementations(rows):
        points = []
        for r in ok_rows(rows):
            if r["implementation"] == name and r["pass"] == FWD_BWD and r["dtype"] == dtype:
                floor = index.get((FLOOR, FWD_BWD, dtype, r["batch"], r["classes"]))
                if floor:
                    points.append((r["batch"] * r["classes"], r["median_s"] / floor["median_s"]))
        if points:
            ax.plot(
                *zip(*sorted(points), strict=True),
                **(style.line_style(name) | {"linestyle": "none"}),
                alpha=0.85,
            )
    if not ax.lines:
        return None
    ax.axhline(1, **style.line_style(FLOOR))
    ax.axhline(2, **style.REFERENCE, label="2 × floor")
    _log_axes(ax)
    ax.set(xlabel="logits N·C", ylabel="forward+backward time / floor time")
    fig.legend(loc="outside right center")
    ax.set_title(style.title("time as a multiple of the floor", metadata, dtype))
    return fig


DRAW: dict[str, Chart] = {
    "time_vs_batch": partial(_line_grid, quantity=TIME, x_axis="batch"),
    "time_vs_classes": partial(_line_grid, quantity=TIME, x_axis="classes"),
    "memory_vs_batch": partial(_line_grid, quantity=MEMORY, x_axis="batch"),
    "memory_vs_classes": partial(_line_grid, quantity=MEMORY, x_axis="classes"),
    "speedup": _speedup_heatmaps,
    "floor_multiple": _floor_multiple,
}
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


def plot_run(rows: list[dict], metadata: dict, out_dir: Path) -> list[Path]:
    """Every chart for one run, per dtype (and per device and smoothing where it has several)."""
    written = []
    with style.context():
        for suffix, subset in variants(rows):
            for dtype in dtypes(subset):
                for chart, draw in DRAW.items():
                    fig = draw(subset, metadata, dtype)
                    if fig is not None:
                        written.append(style.save(fig, out_dir / chart_file(chart, dtype, suffix)))
    return written


Shape = tuple[str, int, int]  # dtype, N, C
Source = tuple[str, list[dict], dict]  # label, rows, metadata


def _shapes(rows: list[dict]) -> set[Shape]:
    return {(r["dtype"], r["batch"], r["classes"]) for r in ok_rows(rows) if r["pass"] == FWD_BWD}


def shared_shapes(sources: list[Source]) -> list[Shape]:
    """The (dtype, N, C) measured forward+backward in every source, by dtype, then N·C, then N."""
    common = set.intersection(*(_shapes(rows) for _, rows, _ in sources))
    return sorted(common, key=lambda s: (s[0], s[1] * s[2], s[1]))


def _side_panel(ax: Axes, label: str, rows: list[dict], metadata: dict, shapes: list[Shape]) -> None:
    """One source's fwd+bwd time at each shape (a tick per shape, the same in every panel); per
    implementation the fastest over the smoothings measured."""
    at = {shape: i for i, shape in enumerate(shapes)}
    for name in [*implementations(rows), FLOOR]:
        best: dict[int, float] = {}
        for r in ok_rows(rows):
            i = at.get((r["dtype"], r["batch"], r["classes"]))
            if r["implementation"] == name and r["pass"] == FWD_BWD and i is not None:
                best[i] = min(best.get(i, math.inf), r["median_s"])
        if best:
            xs = sorted(best)
            # the floor's line has no marker: give it one that shows where it has a single shape
            marker = {"marker": "_", "markersize": 14} if name == FLOOR else {}
            ax.plot(xs, [best[x] for x in xs], **(style.line_style(name) | marker))
    ax.set_yscale("log")
    ax.grid(True, which="both")
    ax.set_xticks(range(len(shapes)), [f"{n}×{c}" for _, n, c in shapes], rotation=45, ha="right")
    ax.set_xlabel("N × C")
    ax.set_title(style.title(label, metadata, shapes[0][0]))


def side_by_side_figure(sources: list[Source]) -> Figure:
    """fwd+bwd time at the shapes every source measured: a column of panels per source, a row per
    dtype, the same ticks in each, so that a point compares like with like."""
    shapes = shared_shapes(sources)
    if not shapes:
        raise ValueError("no (dtype, N, C) was measured forward+backward in every source")
    by_dtype = {dtype: [s for s in shapes if s[0] == dtype] for dtype in dict.fromkeys(s[0] for s in shapes)}
    fig = style.figure(5.5 * len(sources), 5.2 * len(by_dtype))
    axes = fig.subplots(len(by_dtype), len(sources), squeeze=False, sharey=True)
    for row, dtype_shapes in zip(axes, by_dtype.values(), strict=True):
        for ax, (label, rows, metadata) in zip(row, sources, strict=True):
            _side_panel(ax, label, rows, metadata, dtype_shapes)
        row[0].set_ylabel("forward+backward median time (s)")
    _legend_below(fig, columns=4 * len(sources))
    return fig


def plot_side_by_side(sources: list[Source], out_path: Path) -> Path:
    """`side_by_side_figure`, written to out_path."""
    with style.context():
        return style.save(side_by_side_figure(sources), out_path)
