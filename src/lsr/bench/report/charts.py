"""The chart functions: each takes a run's rows (one variant), its metadata and a dtype, and returns a
figure or None where the rows cannot make it. `lsr.bench.report.plot` names them in `DRAW` and
writes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, NullLocator

from lsr.bench.data import FLOOR, FLOOR_ALLOC, FLOORS, PASSES, floor_for
from lsr.bench.report import selection, style
from lsr.bench.report.selection import FWD_BWD, implementations, index_rows, ok_rows
from lsr.bench.report.tables import format_bandwidth, format_caches
from lsr.registry import EAGER_BASELINE, PAPER_PAIR

DODGE = 0.06  # log2 units between neighbouring implementations' points in the line charts
GRADIENT = "gradient"  # the reference line of the memory charts: N·C·itemsize bytes


@dataclass(frozen=True)
class Quantity:
    """What a line chart plots against a size: the measured value of a row and its reference line."""

    title: str
    ylabel: str
    value: Callable[[dict], float | None]
    reference: str  # FLOOR: the floors' own times (both); GRADIENT: the gradient's size in bytes


TIME = Quantity("time", "median time (s)", lambda r: r["median_s"], FLOOR)
MEMORY = Quantity(
    "peak memory", "peak allocated above inputs (bytes)", lambda r: r["peak_bytes"] or None, GRADIENT
)


def _log_axes(ax: Axes, x_base: int = 10) -> None:
    """Log-log axes with a light grid at major and minor ticks."""
    ax.set_xscale("log", base=x_base)
    ax.set_yscale("log")
    ax.grid(True, which="both")


def plain_ticks(axis: Axis) -> None:
    """Ticks at 1, 2, 3 and 5 of every decade of a log axis, written as plain numbers (0.5, 2, 10)."""
    axis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter("{x:g}")
    axis.set_minor_formatter(NullFormatter())


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
    names = implementations(rows) + (list(FLOORS) if quantity.reference == FLOOR else [])

    def rows_at(name: str) -> list[tuple[int, dict]]:
        key_pass = FWD_BWD if name in FLOORS else pass_  # a floor is measured once, as its reference
        found = []
        for x in xs:
            size = {x_axis: x, panel_axis: panel}
            row = index.get((name, key_pass, dtype, size["batch"], size["classes"]))
            if row is not None and quantity.value(row) is not None:
                found.append((x, row))
        return found

    for i, name in enumerate(names):
        # Lines that coincide (e.g. two losses at the same peak memory) would hide each other: each
        # implementation's points are shifted by a few percent along the log x axis
        dodge = 2 ** ((i - (len(names) - 1) / 2) * DODGE)
        points = [(x * dodge, quantity.value(row)) for x, row in rows_at(name)]
        if points:
            look = style.line_style(name)
            ax.plot(*zip(*points, strict=True), **look)
            busy = [(x * dodge, quantity.value(r)) for x, r in rows_at(name) if r.get("busy")]
            if busy:  # hollow: timed while other processes loaded the machine
                hollow = {
                    "marker": look.get("marker") or "o",
                    "markerfacecolor": "white",
                    "linestyle": "none",
                }
                ax.plot(*zip(*busy, strict=True), color=look["color"], **hollow)
    if quantity.reference == GRADIENT:
        grads = [x * panel * _itemsize(rows, dtype) for x in xs]
        ax.plot(xs, grads, **style.REFERENCE, label="gradient bytes (N·C·itemsize)")
    _log_axes(ax, x_base=2 if x_axis == "batch" else 10)
    ax.set_title(f"{pass_}, {'C' if panel_axis == 'classes' else 'N'} = {panel}")


def line_grid(
    rows: list[dict], metadata: dict, dtype: str, quantity: Quantity, x_axis: str, *, variant: str = ""
) -> Figure | None:
    """Rows of panels = the passes measured, columns = values of the other size axis; a line per
    implementation. None where the x axis has one value: no line to draw, a table says as much."""
    panel_axis = "classes" if x_axis == "batch" else "batch"
    measured = [r for r in ok_rows(rows) if r["dtype"] == dtype]
    panels = sorted({r[panel_axis] for r in measured})
    passes = [p for p in PASSES if any(r["pass"] == p for r in measured if r["implementation"] not in FLOORS)]
    if len({r[x_axis] for r in measured}) < 2 or not passes:
        return None
    fig = style.figure(3.6 * len(panels) + 1, 3.0 * len(passes) + 1.4)
    axes = fig.subplots(len(passes), len(panels), squeeze=False)
    for i, pass_ in enumerate(passes):
        for j, panel in enumerate(panels):
            _line_panel(axes[i][j], rows, dtype, quantity, pass_, x_axis, panel)
        axes[i][0].set_ylabel(quantity.ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("batch size N" if x_axis == "batch" else "classes C")
    style.legend_below(fig, columns=2 * len(panels) + 1)  # as many as fit under the panels
    fig.suptitle(style.title(f"{quantity.title} vs {x_axis}", metadata, dtype, variant))
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
    """The paper's pair (SparseLSR vs its dense baseline), then every implementation vs eager native
    (those the run has)."""
    names = implementations(rows)
    pairs = [PAPER_PAIR] if set(PAPER_PAIR) <= set(names) else []
    baseline = EAGER_BASELINE
    return pairs + [(name, baseline) for name in names if name != baseline and baseline in names]


def speedup_heatmaps(rows: list[dict], metadata: dict, dtype: str, *, variant: str = "") -> Figure | None:
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
    label = "speedup: second's time / first's"
    bar = fig.colorbar(image, ax=axes.flat[: len(pairs)], shrink=0.8, label=label)
    ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    bar.set_ticks(ticks, labels=[f"{t:g}×" if t >= 1 else f"1/{1 / t:g}×" for t in ticks])
    bar.minorticks_off()
    fig.suptitle(
        style.title("forward+backward speedup (green: the first is faster)", metadata, dtype, variant)
    )
    return fig


def _fwd_bwd_points(rows: list[dict], name: str, dtype: str, y: Callable[[dict], float | None]) -> list:
    """(N·C, y(row)) of name's measured forward+backward rows of that dtype, by N·C; None values left out."""
    points = [
        (r["batch"] * r["classes"], y(r))
        for r in ok_rows(rows)
        if r["implementation"] == name and r["pass"] == FWD_BWD and r["dtype"] == dtype
    ]
    return sorted((x, v) for x, v in points if v is not None)


def floor_multiple(rows: list[dict], metadata: dict, dtype: str, *, variant: str = "") -> Figure | None:
    """fwd+bwd time / the time of the implementation's own floor (in place: FLOOR; out of place:
    FLOOR_ALLOC) against the number of logits N·C, a point per size; and FLOOR_ALLOC / FLOOR, what
    allocating the gradient costs."""
    index = index_rows(rows)
    fig = style.figure(9.5, 5)
    ax = fig.subplots()
    for name in [*implementations(rows), FLOOR_ALLOC]:
        floor = FLOOR if name == FLOOR_ALLOC else floor_for(name)

        def multiple(r: dict, floor: str = floor) -> float | None:
            own = index.get((floor, FWD_BWD, r["dtype"], r["batch"], r["classes"]))
            return r["median_s"] / own["median_s"] if own else None

        points = _fwd_bwd_points(rows, name, dtype, multiple)
        look = style.line_style(name) | style.FLOOR_MARKERS.get(name, {})
        if points:
            label = f"{name} ÷ {floor}"
            ax.plot(*zip(*points, strict=True), **(look | {"linestyle": "none", "label": label}), alpha=0.85)
    if not ax.lines:
        return None
    ax.axhline(1, color="black", linestyle="-", linewidth=0.8, label="1 × its floor")
    ax.axhline(2, **style.REFERENCE, label="2 × its floor")
    _log_axes(ax)
    plain_ticks(ax.yaxis)
    ylabel = f"fwd+bwd time / its floor's time\n(in place: {FLOOR}; out of place: {FLOOR_ALLOC})"
    ax.set(xlabel="logits N·C", ylabel=ylabel)
    fig.legend(loc="outside right center")
    ax.set_title(style.title("time as a multiple of the floor of its kind", metadata, dtype, variant))
    return fig


def _cache_marks(ax: Axes, metadata: dict, itemsize: float) -> None:
    """A vertical line where the logits fill each of the L2 and L3 caches a CPU run recorded, named
    at its foot, and one legend entry saying what the lines are."""
    levels = (metadata.get("cache_bytes") or {}) if metadata.get("device", "cpu") == "cpu" else {}
    caches = {level: size for level, size in levels.items() if level in ("L2", "L3") and size}
    at_foot = {"va": "bottom", "ha": "left", "color": "grey", "fontsize": style.ANNOTATION_SIZE}
    for level, size in caches.items():
        ax.axvline(size / itemsize, **style.REFERENCE)
        ax.text(size / itemsize, 0.01, f" {level}", transform=ax.get_xaxis_transform(), **at_foot)
    if caches:
        ax.plot([], [], **style.REFERENCE, label=f"logits fill a cache ({format_caches(caches)})")


def bandwidth(rows: list[dict], metadata: dict, dtype: str, *, variant: str = "") -> Figure | None:
    """A roofline view: the bytes per second of the least traffic a forward+backward makes (2 ·
    logits bytes / time) against N·C, a point per size and implementation, the floors as lines, the
    machine's copy bandwidth as the roof, and where the logits fill the L2 and L3 caches."""
    fig = style.figure(9.5, 5)
    ax = fig.subplots()

    def achieved(r: dict) -> float | None:  # GB/s
        return selection.achieved_bandwidth(r)[0] / 1e9

    for name in [*implementations(rows), *FLOORS]:
        points = _fwd_bwd_points(rows, name, dtype, achieved)
        if points:
            look = style.line_style(name) | style.FLOOR_MARKERS.get(name, {"linestyle": "none"})
            ax.plot(*zip(*points, strict=True), **look, alpha=0.85)
    if not ax.lines:
        return None
    copy = selection.recorded_copy_bandwidth(metadata)
    if copy:
        ax.axhline(
            copy / 1e9, color="black", linewidth=1.6, label=f"copy bandwidth, {format_bandwidth(copy)}"
        )
    _log_axes(ax)
    plain_ticks(ax.yaxis)
    if copy:  # the same axis as a share of the copy bandwidth, on the right
        share = ax.twinx()
        share.set_yscale("log")
        share.set_ylim(*(y / (copy / 1e9) for y in ax.get_ylim()))
        share.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        share.yaxis.set_major_formatter(lambda share, _: f"{100 * share:g}%")
        share.yaxis.set_minor_locator(NullLocator())
        share.set_ylabel("share of the copy bandwidth")
    _cache_marks(ax, metadata, _itemsize(rows, dtype))
    ax.set(xlabel="logits N·C", ylabel="GB/s: 2 · logits bytes / fwd+bwd time")
    style.legend_below(fig, columns=4)
    ax.set_title(
        style.title("forward+backward bandwidth (the least traffic over the time)", metadata, dtype, variant)
    )
    return fig


def thread_scaling(rows: list[dict], metadata: dict, dtype: str, *, variant: str = "") -> Figure | None:
    """Forward+backward speedup over one thread against the thread count, a panel per size measured
    at several counts, a line per implementation with the floors' own (what the memory system gives)
    and the ideal speedup = threads. None where no case was measured at 1 thread and more."""
    scaling = {
        key: steps for key, steps in selection.thread_scaling(rows).items() if key[2] == dtype and steps
    }
    # The sizes where an implementation, not only a floor (which every variant's rows include), scaled
    measured = {(key[3], key[4]) for key in scaling if key[0] not in FLOORS}
    sizes = sorted(measured, key=lambda s: s[0] * s[1])
    if not sizes:
        return None
    fig = style.figure(3.8 * len(sizes) + 1, 4.4)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    for ax, (batch, classes) in zip(axes, sizes, strict=True):
        here = {key[0]: steps for key, steps in scaling.items() if (key[3], key[4]) == (batch, classes)}
        counts = sorted({1, *(s.threads for steps in here.values() for s in steps)})
        ax.plot(counts, counts, **style.REFERENCE, label="ideal: speedup = threads")
        for name in [n for n in [*implementations(rows), *FLOORS] if n in here]:
            points = [(1, 1.0), *((s.threads, s.speedup) for s in here[name])]
            look = style.line_style(name) | style.FLOOR_MARKERS.get(name, {})
            ax.plot(*zip(*points, strict=True), **look, alpha=0.85)
        ax.set_xticks(counts)
        ax.set_title(f"N = {batch}, C = {classes}")
        ax.set_xlabel("torch intra-op threads")
    axes[0].set_ylabel("fwd+bwd speedup over 1 thread")
    style.legend_below(fig, columns=2 * len(sizes) + 1)
    fig.suptitle(style.title("speedup over one thread vs threads", metadata, dtype, variant))
    return fig
