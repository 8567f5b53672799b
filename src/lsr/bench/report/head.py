"""The LM head's report: head rows (`hidden` > 0, `lsr.heads`) as charts, tables and the choice.

- `head_charts`: per dtype and (H, V) with two or more token counts, one figure: a row per
  smoothing, peak memory vs tokens beside time over `floor-gemm` (the three GEMMs alone) vs tokens.
  Every head loss of the run is in the legend; one with no measurement in a panel is named under it
  with its status and reason.
- `head_ship_tables`: per shape, smoothing 0 and > 0 apart, the lowest peak, the fastest, the
  fastest within 2x of the lowest peak, ours (the exact head loss with the registry's `ours` flag),
  and whether ours is both the lowest peak and that fastest, or what beats it. Chosen among
  exact-smoothing losses that passed the gate (our SparseLSR head computes another function: its
  own column).
- `head_table`: every forward+backward row at one dtype, for results/README.md.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import lsr.heads
from lsr.bench.data import FLOOR_GEMM
from lsr.bench.report import style
from lsr.bench.report.selection import FWD_BWD, MiB, at_all_cores, ok_rows
from lsr.bench.report.tables import format_table


def _ours(kind: str) -> str:
    """This project's head loss of a smoothing kind (the registry's `ours` flag)."""
    return next(i.name for i in lsr.heads.HEAD_REGISTRY.values() if i.ours and i.smoothing_kind == kind)


OURS, OURS_SPARSE = _ours("exact"), _ours("sparse")
WITHIN_PEAK = 2.0  # "fastest among those within 2x of the lowest peak"
HEAD_CHART = "head"
Shape = tuple[str, str, int, int, int, str]  # device, dtype, tokens, hidden, vocabulary, machine


def is_head_row(r: dict) -> bool:
    return bool(r.get("hidden"))


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the logits losses' rows, the head losses' rows)."""
    return [r for r in rows if not is_head_row(r)], [r for r in rows if is_head_row(r)]


def shape_of(r: dict) -> Shape:
    """A head row's shape, and the machine it ran on (a merged run holds several)."""
    return r["device"], r["dtype"], r["batch"], r["hidden"], r["classes"], r.get("machine") or ""


def _names(rows: list[dict]) -> list[str]:
    """The head losses of the run, in the registry's order (floors left out)."""
    present = {r["implementation"] for r in rows}
    return [name for name in lsr.heads.HEAD_REGISTRY if name in present]


def _fwd_bwd(rows: list[dict]) -> list[dict]:
    return [r for r in at_all_cores(rows) if r["pass"] == FWD_BWD]


def _floors(rows: list[dict]) -> dict[Shape, dict]:
    return {shape_of(r): r for r in ok_rows(_fwd_bwd(rows)) if r["implementation"] == FLOOR_GEMM}


def head_chart_file(dtype: str, hidden: int, vocab: int) -> str:
    return f"{HEAD_CHART}_{dtype}_H{hidden}_V{vocab}.png"


# --- charts ---------------------------------------------------------------------------------------------


def _panel(ax, rows: list[dict], names: list[str], floors: dict, quantity: str) -> None:
    """One panel: a line per head loss over tokens; the peak panel names under it those it could not draw."""
    missing, last = [], {}
    for order, name in enumerate(names):
        own = sorted((r for r in rows if r["implementation"] == name), key=lambda r: r["batch"])
        points = []
        for r in own:
            if r["status"] != "ok":
                continue
            if quantity == "peak" and r.get("peak_bytes") is not None:
                points.append((r["batch"], r["peak_bytes"] / MiB))
            elif quantity == "time" and shape_of(r) in floors:
                points.append((r["batch"], r["median_s"] / floors[shape_of(r)]["median_s"]))
        if points:
            xs, ys = zip(*points, strict=True)
            # Several losses share a peak (all that hold the logits): each later one drawn thinner
            # and smaller, so that coinciding lines and markers still show every loss
            size = {"markersize": max(3.0, 11 - 1.0 * order), "linewidth": max(0.8, 3.2 - 0.3 * order)}
            ax.plot(xs, ys, **style.line_style(name), **size, alpha=0.85)
            last[name] = (xs[-1], ys[-1])
        elif own:
            missing.append(f"{name} ({own[0]['status']})")
        # a point lost at some sizes only (oom, skipped at large N) is named with its N
        if points:
            missing += [f"{name} ({r['status']} at N {r['batch']})" for r in own if r["status"] != "ok"]
    if quantity == "peak":
        _name_coinciding(ax, last)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if quantity == "time":
        ax.axhline(1.0, **style.REFERENCE, label="_floor-gemm")
    _round_ticks(ax)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set_xticks(sorted({r["batch"] for r in rows}))
    note = textwrap.fill(f"not measured: {', '.join(missing)}", 80) if missing and quantity == "peak" else ""
    ax.set_xlabel("tokens N" + (f"\n{note}" if note else ""))
    if quantity == "time":
        ax.set_ylabel("forward+backward time / floor-gemm")
    else:
        ax.set_ylabel("peak MiB above the inputs (gradients included)")
    ax.grid(True, which="both", alpha=0.3)


def _name_coinciding(ax, last: dict[str, tuple[float, float]]) -> None:
    """Where several losses end at one peak (within 2%), name them beside it: one line hides the others."""
    groups: list[list[str]] = []
    for name, (_, y) in sorted(last.items(), key=lambda item: item[1][1]):
        if groups and y <= 1.02 * last[groups[-1][0]][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    for group in (g for g in groups if len(g) > 1):
        x, y = last[group[0]]
        top = group is groups[-1]  # the highest group's names go below its point, inside the panel
        ax.annotate(
            "\n".join(group),
            (x, y),
            xytext=(-8, -6 if top else 4),
            textcoords="offset points",
            ha="right",
            va="top" if top else "bottom",
            fontsize=7,
        )


def _round_ticks(ax) -> None:
    """Log y ticks at 1, 2, 3 and 5 of every decade the data spans (finer where that gives fewer
    than 3), as plain numbers (0.3, 2, 500)."""
    low, high = ax.get_ylim()
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 7), (1, 1.2, 1.4, 1.6, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0**d for d in decades for m in mantissas if low <= m * 10.0**d <= high]
        if len(ticks) >= 3:  # a narrow range (times within 2x) gets finer steps
            break
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low, high)


def head_figure(rows: list[dict], metadata: dict, dtype: str, hidden: int, vocab: int) -> Figure | None:
    """Peak memory vs tokens and time over floor-gemm vs tokens, a row of panels per smoothing."""
    here = [r for r in _fwd_bwd(rows) if (r["dtype"], r["hidden"], r["classes"]) == (dtype, hidden, vocab)]
    if len({r["batch"] for r in ok_rows(here)}) < 2:
        return None
    floors = _floors(here)
    names = _names([r for r in here if r["implementation"] != FLOOR_GEMM])
    smoothings = sorted({r["smoothing"] for r in here if r["implementation"] != FLOOR_GEMM})
    fig = style.figure(12, 4.6 * len(smoothings) + 1.2)
    axes = fig.subplots(len(smoothings), 2, squeeze=False)
    for (peak_ax, time_ax), smoothing in zip(axes, smoothings, strict=True):
        subset = [r for r in here if r["smoothing"] == smoothing]
        _panel(peak_ax, subset, names, floors, "peak")
        _panel(time_ax, subset, names, floors, "time")
        peak_ax.set_title(f"smoothing {smoothing:g}: peak memory vs tokens")
        time_ax.set_title(f"smoothing {smoothing:g}: time over floor-gemm (the three GEMMs)")
    fig.suptitle(style.title(f"LM head losses, H {hidden}, V {vocab}", metadata, dtype))
    style.legend_below(fig, columns=5)
    return fig


def head_charts(rows: list[dict], metadata: dict, out_dir: Path) -> list[Path]:
    """The head figures of a run, one per dtype and (H, V) with two or more token counts."""
    written = []
    shapes = sorted({(r["dtype"], r["hidden"], r["classes"]) for r in rows if is_head_row(r)})
    with style.context():
        for dtype, hidden, vocab in shapes:
            fig = head_figure(rows, metadata, dtype, hidden, vocab)
            if fig is not None:
                written.append(style.save(fig, out_dir / head_chart_file(dtype, hidden, vocab)))
    return written


# --- which one to ship, and the table ----------------------------------------------------------------------


def _figure(x: float) -> str:
    """Three significant figures, without an exponent: 1,064, 76.5, 0.432."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"].replace("-", " ")
    peak = "" if r.get("peak_bytes") is None else f", {_figure(r['peak_bytes'] / MiB)} MiB"
    return f"{_figure(r['median_s'] * 1e3)} ms{peak}" + (" (busy)" if r.get("busy") else "")


def _named(r: dict | None) -> str:
    return "" if r is None else f"{r['implementation']}: {_cell(r)}"


def head_choice(of: dict[str, dict]) -> dict:
    """For one shape and smoothing (`of`: its forward+backward rows by name): the lowest peak, the
    fastest, the fastest within WITHIN_PEAK of the lowest peak, among the exact losses that passed
    the gate and were timed on an idle machine; and whether ours is the lowest peak and that fastest."""
    gated = [
        r
        for name, r in of.items()
        if r["status"] == "ok"
        and not r.get("busy")
        and r.get("peak_bytes") is not None
        and lsr.heads.get(name).smoothing_kind == "exact"
    ]
    if not gated:
        return {"lowest": None, "fastest": None, "within": None, "verdict": "none measured"}
    lowest = min(gated, key=lambda r: r["peak_bytes"])
    fastest = min(gated, key=lambda r: r["median_s"])
    within = min(
        (r for r in gated if r["peak_bytes"] <= WITHIN_PEAK * lowest["peak_bytes"]),
        key=lambda r: r["median_s"],
    )
    ours = of.get(OURS)
    if ours is None or ours not in gated:
        why = "not measured" if ours is None else ("timed while busy" if ours.get("busy") else ours["status"])
        verdict = f"no: {OURS} {why}"
    elif ours is lowest and ours is within:
        verdict = "yes"
    else:
        mib = {r["implementation"]: _figure(r["peak_bytes"] / MiB) for r in (ours, lowest)}
        beaten = []
        if ours is not lowest:
            name = lowest["implementation"]
            beaten.append(f"{name} has a lower peak ({mib[name]} against {mib[OURS]} MiB)")
        if ours is not within:
            ms = {r["implementation"]: _figure(r["median_s"] * 1e3) for r in (ours, within)}
            name = within["implementation"]
            beaten.append(f"{name} is faster within 2x of the lowest peak ({ms[name]} against {ms[OURS]} ms)")
        verdict = "no: " + "; ".join(beaten)
    return {"lowest": lowest, "fastest": fastest, "within": within, "verdict": verdict}


HEAD_SHIP_HEADERS = [
    "dtype",
    "N",
    "H",
    "V",
    "lowest peak",
    "fastest",
    "fastest within 2x of the lowest peak",
    OURS,
    OURS_SPARSE,
    f"{OURS} lowest peak and fastest within 2x?",
]
HEAD_SHIP_TITLES = {False: "LM head, smoothing 0 (plain cross-entropy)", True: "LM head, smoothing > 0"}
HEAD_SHIP_INTRO = (
    "Per shape, among the exact-smoothing head losses that passed the float64 gate (forward+backward, "
    "all cores, idle machine): the lowest peak memory, the fastest, and the fastest of those whose peak "
    "is within 2x of the lowest; then ours, and SparseLSR's (another function: not in the choice). "
    "Peaks are bytes allocated above the inputs, the gradients included."
)


def head_ship_tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, lines) for smoothing 0 and for smoothing > 0, where the run has rows of them."""
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in _fwd_bwd([r for r in rows if is_head_row(r) and r["implementation"] != FLOOR_GEMM]):
        by_case[(*shape_of(r), r["smoothing"])][r["implementation"]] = r
    tables = []
    for smoothed, title in HEAD_SHIP_TITLES.items():
        keys = sorted(k for k in by_case if (k[-1] > 0) == smoothed)
        if not keys:
            continue
        lines = []
        for key in keys:
            of = by_case[key]
            choice = head_choice(of)
            device, dtype, tokens, hidden, vocab, machine, smoothing = key
            lines.append(
                [
                    dtype + (f" s={smoothing:g}" if smoothed else ""),
                    tokens,
                    hidden,
                    vocab,
                    _named(choice["lowest"]),
                    _named(choice["fastest"]),
                    _named(choice["within"]),
                    _cell(of.get(OURS)),
                    _cell(of.get(OURS_SPARSE)),
                    choice["verdict"],
                ]
            )
        tables.append((title, HEAD_SHIP_HEADERS, lines))
    return tables


def format_head_ship(rows: list[dict], markdown: bool = False) -> str:
    parts = []
    for title, headers, lines in head_ship_tables(rows):
        table = format_table(headers, lines, markdown=markdown, align="lrrrllllll")
        parts.append(f"**{title}**\n\n{table}" if markdown else f"{title}:\n{table}")
    return "\n\n".join(parts)


TABLE_HEADERS = [
    "implementation",
    "N",
    "H",
    "V",
    "smoothing",
    "pass",
    "median ms",
    "IQR ms",
    "x floor-gemm",
    "peak MiB",
    "status",
]


def head_table(rows: list[dict], dtype: str) -> str:
    """Every head row of one dtype (at all cores): time, IQR, its multiple of floor-gemm, peak, status."""
    here = [r for r in at_all_cores(rows) if is_head_row(r) and r["dtype"] == dtype]
    floors = _floors(here)
    lines = []
    for r in sorted(here, key=lambda r: (r["hidden"], r["classes"], r["batch"], r["smoothing"], r["pass"])):
        ok = r["status"] == "ok"
        floor = floors.get(shape_of(r))
        over = (
            f"{r['median_s'] / floor['median_s']:.2f}"
            if ok and floor is not None and r["pass"] == FWD_BWD and r["implementation"] != FLOOR_GEMM
            else ""
        )
        status = r["status"] + (" (busy)" if r.get("busy") else "")
        lines.append(
            [
                r["implementation"],
                r["batch"],
                r["hidden"],
                r["classes"],
                "" if r["implementation"] == FLOOR_GEMM else f"{r['smoothing']:g}",
                r["pass"],
                _figure(r["median_s"] * 1e3) if ok else "",
                _figure(r["iqr_s"] * 1e3) if ok else "",
                over,
                f"{r['peak_bytes'] / MiB:,.1f}" if ok and r.get("peak_bytes") is not None else "",
                status if ok or not r["message"] else f"{status}: {r['message'][:100]}",
            ]
        )
    return format_table(TABLE_HEADERS, lines, markdown=True, align="lrrrrlrrrrl")


def head_losses_table(rows: list[dict]) -> str:
    """What each head loss of the run is, and what it knowingly does differently (`lsr.heads`)."""
    lines = [
        [name, impl.description, impl.notes]
        for name, impl in lsr.heads.HEAD_REGISTRY.items()
        if any(r["implementation"] == name for r in rows)
    ]
    return format_table(["head loss", "what", "notes"], lines, markdown=True, align="lll")


def head_section(run_dir: Path, rel: Path, rows: list[dict]) -> list[str]:
    """results/README.md's lines for a run's head rows: the choice, the losses, the charts, the tables."""
    lines = ["### LM head losses", "", HEAD_SHIP_INTRO, "", format_head_ship(rows, markdown=True), ""]
    lines += [head_losses_table(rows), ""]
    for dtype in sorted({r["dtype"] for r in rows if is_head_row(r)}):
        shapes = sorted({(r["hidden"], r["classes"]) for r in rows if is_head_row(r) and r["dtype"] == dtype})
        charts = [head_chart_file(dtype, h, v) for h, v in shapes]
        lines += [f"#### {dtype}", ""]
        lines += [f"![head {dtype}]({rel}/{name})" for name in charts if (run_dir / name).exists()]
        lines += ["", head_table(rows, dtype), ""]
    return lines
