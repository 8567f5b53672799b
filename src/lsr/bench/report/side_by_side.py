"""Several runs next to each other: forward+backward time at the (dtype, N, C) they all measured.

Each run shows its main variant (the one with the most rows, e.g. smoothing 0.1 with no ignored
targets and no weights), so that a line never mixes variants; colours, markers and titles come from
`lsr.bench.report.style`, as in every chart of a run.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lsr.bench.data import FLOORS
from lsr.bench.report import style
from lsr.bench.report.selection import FWD_BWD, at_all_cores, implementations, ok_rows, variants

__all__ = ["plot_side_by_side", "shared_shapes", "side_by_side_figure"]

Shape = tuple[str, int, int]  # dtype, N, C
Source = tuple[str, list[dict], dict]  # label, rows, metadata


def _shapes(rows: list[dict]) -> set[Shape]:
    return {(r["dtype"], r["batch"], r["classes"]) for r in ok_rows(rows) if r["pass"] == FWD_BWD}


def shared_shapes(sources: list[Source]) -> list[Shape]:
    """The (dtype, N, C) measured forward+backward in every source's main variant, by dtype, then N·C,
    then N."""
    common = set.intersection(*(_shapes(main_variant(rows)[1]) for _, rows, _ in sources))
    return sorted(common, key=lambda s: (s[0], s[1] * s[2], s[1]))


def main_variant(rows: list[dict]) -> tuple[str, list[dict]]:
    """The label and rows of the run's variant with the most rows (the label empty where it has one),
    at all cores."""
    _, label, subset = max(variants(at_all_cores(rows)), key=lambda v: len(v.rows))
    return label, subset


def _side_panel(ax: Axes, label: str, rows: list[dict], metadata: dict, shapes: list[Shape]) -> None:
    """One source's fwd+bwd time at each shape (a tick per shape, the same in every panel), of its
    main variant."""
    variant, rows = main_variant(rows)
    at = {shape: i for i, shape in enumerate(shapes)}
    for name in [*implementations(rows), *FLOORS]:
        best: dict[int, float] = {}
        for r in ok_rows(rows):
            i = at.get((r["dtype"], r["batch"], r["classes"]))
            if r["implementation"] == name and r["pass"] == FWD_BWD and i is not None:
                best[i] = min(best.get(i, math.inf), r["median_s"])
        if best:
            xs = sorted(best)
            # a floor's line has no marker: give it one that shows where it has a single shape
            marker = {"marker": "_", "markersize": 14} if name in FLOORS else {}
            ax.plot(xs, [best[x] for x in xs], **(style.line_style(name) | marker))
    ax.set_yscale("log")
    ax.grid(True, which="both")
    ax.set_xticks(range(len(shapes)), [f"{n}×{c}" for _, n, c in shapes], rotation=45, ha="right")
    ax.set_xlabel("N × C")
    ax.set_title(style.title(f"{label} ({variant})" if variant else label, metadata, shapes[0][0]))


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
    style.legend_below(fig, columns=4 * len(sources))
    return fig


def plot_side_by_side(sources: list[Source], out_path: Path) -> Path:
    """`side_by_side_figure`, written to out_path."""
    with style.context():
        return style.save(side_by_side_figure(sources), out_path)
