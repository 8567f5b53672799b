"""Which one to ship: per device, dtype and size, the fastest implementation that passed the gate.

Chosen separately for exact label smoothing and for SparseLSR (they compute different functions),
and for out-of-place and in-place use: an in-place loss writes the gradient over its logits, so it
is no drop-in replacement for `F.cross_entropy` and competes with in-place ones only. Chosen from
the forward+backward rows at smoothing > 0 with no ignored targets and no class weights; the other
variants have their own rows in results.csv. `lsr-bench run` prints these tables after its per-row
table, and results/README.md holds them per run.
"""

from __future__ import annotations

from collections import defaultdict

import lsr
from lsr.bench.data import FLOOR, floor_for
from lsr.bench.report import head
from lsr.bench.report.selection import FWD_BWD, MiB, at_all_cores, implementations, is_floor, ratio
from lsr.bench.report.tables import format_table
from lsr.registry import BASELINES  # what a user would otherwise call: the speedups' numerators

__all__ = ["GROUPS", "format_ship_report", "format_ship_tables", "ship_rows", "ship_section", "ship_tables"]

# (smoothing kind, in place) -> the group's title
GROUPS = {
    ("exact", False): "exact smoothing, out-of-place (a drop-in for F.cross_entropy)",
    ("exact", True): "exact smoothing, in-place (overwrites its logits: not a drop-in)",
    ("sparse", False): "SparseLSR, out-of-place",
    ("sparse", True): "SparseLSR, in-place (overwrites its logits: not a drop-in)",
}
HEADING = "Which one to ship"
INTRO = (
    "The fastest implementation (forward+backward median) that passed the correctness gate, at "
    "smoothing > 0 with no ignored targets and no class weights (the other variants have their own "
    "rows in results.csv). Speedups are native's and native-compiled's time over the chosen one's; "
    "≈ names another within the measured noise (the two IQRs added). Every implementation of the "
    "group is marked (those the run measured, and those that cannot run here): ok, failed (the gate "
    "rejected it), unsupported, not available, error, oom, skipped, not measured. An in-place loss writes the gradient over its logits: it is not a drop-in "
    "replacement, and is chosen among in-place ones only."
)
CONSOLE_NOTE = (
    "the fastest forward+backward that passed the gate, at smoothing > 0, no ignored targets, "
    "unweighted; ≈: within the measured noise"
)
CaseKey = tuple[str, str, float, int, int]  # device, dtype, smoothing, N, C


def ship_rows(rows: list[dict]) -> list[dict]:
    """The rows the choice is made from: forward+backward, smoothing > 0, nothing ignored, unweighted,
    at all cores, and not timed while other processes loaded the machine (column busy)."""
    return [r for r in _candidates(rows) if not r.get("busy")]


def _busy_left_out(rows: list[dict]) -> str:
    """A sentence saying how many candidate rows were left out as busy, or nothing."""
    busy = sum(1 for r in _candidates(rows) if r.get("busy"))
    return (
        f"{busy} rows timed while other processes loaded the machine (column busy) are left out: "
        "rerun them on an idle machine (delete them and --resume)"
        if busy
        else ""
    )


def _candidates(rows: list[dict]) -> list[dict]:
    return [
        r
        for r in at_all_cores(rows)
        if not is_floor(r)
        and r["pass"] == FWD_BWD
        and r["smoothing"] > 0
        and not r.get("ignore_fraction")
        and not r.get("weighted")
    ]


def in_place(name: str) -> bool:
    """Whether `name` overwrites its logits: measured against the in-place floor."""
    return floor_for(name) == FLOOR


def _missing(name: str, device: str, dtype: str, classes: int) -> str:
    """The mark of an implementation with no row at a case: what the registry says of it there."""
    impl = lsr.REGISTRY.get(name)
    if impl is None:
        return "not measured"
    if not impl.runs_on(device):
        return "not available"
    return "unsupported" if impl.unsupported(classes=classes, dtype=dtype) else "not measured"


def _members(chosen: list[dict], kind: str, inplace: bool) -> list[str]:
    """The group's implementations: those the run measured, in run order, then the registered ones
    that cannot run on a device of the run here (each marked "not available"); none where the run
    measured none of the group."""
    kinds = {r["implementation"]: r["smoothing_kind"] for r in chosen}
    names = [n for n in implementations(chosen) if kinds[n] == kind and in_place(n) == inplace]
    devices = {r["device"] for r in chosen}
    absent = [
        name
        for name, impl in lsr.REGISTRY.items()
        if name not in kinds and impl.smoothing_kind == kind and in_place(name) == inplace
        if any(not impl.runs_on(device) for device in devices)
    ]
    return names + absent if names else []


def _mark(row: dict | None, name: str, key: CaseKey) -> str:
    """ok / failed / unsupported / not available / error / oom / skipped / crashed for one implementation."""
    if row is None:
        return _missing(name, key[0], key[1], key[4])
    return row["status"].replace("-", " ") + (" (busy)" if row.get("busy") else "")


def _within_noise(best: dict, other: dict) -> bool:
    """other's median exceeds best's by no more than the two rows' relative IQRs added."""
    noise = best["iqr_s"] / best["median_s"] + other["iqr_s"] / other["median_s"]
    return other["median_s"] / best["median_s"] - 1 <= noise


def _choice(of: dict[str, dict], names: list[str]) -> dict | None:
    """The fastest measured row among `names`, or None when none passed."""
    ok = [of[n] for n in names if n in of and _idle_ok(of[n])]
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def _idle_ok(row: dict | None) -> bool:
    """Measured, and not while other processes loaded the machine: what a choice may rest on."""
    return row is not None and row["status"] == "ok" and not row.get("busy")


def _ship_cells(best: dict | None, of: dict[str, dict], names: list[str], baselines: list[str]) -> list[str]:
    """Chosen name (and those within its noise), its time, speedups over the baselines, its peak memory."""
    if best is None:
        busy_only = any(n in of and of[n]["status"] == "ok" for n in names)
        return ["none: busy rows only" if busy_only else "none passed", "", *("" for _ in baselines), ""]
    ties = [n for n in names if n in of and of[n] is not best and _idle_ok(of[n])]
    close = [n for n in ties if _within_noise(best, of[n])]
    speedups = [ratio(of.get(b) if _idle_ok(of.get(b)) else None, best) for b in baselines]
    peak = best["peak_bytes"]
    return [
        best["implementation"] + (f" (≈ {', '.join(close)})" if close else ""),
        f"{best['median_s'] * 1e3:.3f}",
        *(f"{s}×" if s else "" for s in speedups),
        f"{peak / MiB:.1f}" if peak is not None else "",
    ]


def ship_tables(rows: list[dict]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """Per group (GROUPS) that the run measured: its title, headers, a row per (device, dtype,
    smoothing, N, C) with the choice and a mark per implementation of the group, and the columns'
    alignment. Device and smoothing get columns only where the rows have more than one value."""
    chosen = _candidates(rows)  # busy rows too: marked "(busy)", never chosen nor a speedup's base
    by_case: dict[CaseKey, dict[str, dict]] = defaultdict(dict)
    for r in chosen:
        by_case[(r["device"], r["dtype"], r["smoothing"], r["batch"], r["classes"])][r["implementation"]] = r
    baselines = [b for b in BASELINES if any(r["implementation"] == b for r in chosen)]  # those measured
    shown = [len({k[i] for k in by_case}) > 1 or i in (1, 3, 4) for i in range(5)]  # dtype, N, C always
    key_headers = [
        h for h, show in zip(("device", "dtype", "smoothing", "N", "C"), shown, strict=True) if show
    ]
    key_align = "".join(a for a, show in zip("llrrr", shown, strict=True) if show)
    tables = []
    for (kind, inplace), title in GROUPS.items():
        names = _members(chosen, kind, inplace)
        if not names:
            continue
        lines = []
        for key in sorted(by_case, key=lambda k: (k[0], k[1], k[2], k[3] * k[4], k[3])):
            of = by_case[key]
            cells = _ship_cells(_choice(of, names), of, names, baselines)
            marks = [_mark(of.get(n), n, key) for n in names]
            lines.append([*(str(v) for v, show in zip(key, shown, strict=True) if show), *cells, *marks])
        headers = [*key_headers, "ship", "fwd+bwd ms", *(f"vs {b}" for b in baselines), "peak MiB", *names]
        tables.append(
            (title, headers, lines, key_align + "lr" + "r" * len(baselines) + "r" + "l" * len(names))
        )
    return tables


def format_ship_tables(rows: list[dict], markdown: bool = False) -> str:
    """The ship tables, each under its group's title (Markdown for the README, else for the console);
    empty when the rows have no forward+backward at smoothing > 0."""
    parts = []
    for title, headers, lines, align in ship_tables(rows):
        table = format_table(headers, lines, markdown=markdown, align=align)
        parts.append(f"**{title}**\n\n{table}" if markdown else f"{title}:\n{table}")
    return "\n\n".join(parts)


def format_ship_report(rows: list[dict]) -> str:
    """What `lsr-bench run` prints after its per-row table: a heading line and the console tables;
    empty when there is nothing to choose from."""
    logits_rows, head_rows = head.split(rows)
    tables = format_ship_tables(logits_rows)
    busy = _busy_left_out(logits_rows)
    report = f"{HEADING} ({CONSOLE_NOTE}):\n\n" + (f"{busy}\n\n" if busy else "") + tables if tables else ""
    heads = head.format_head_ship(head_rows)
    return "\n\n".join(filter(None, [report, heads]))


def ship_section(rows: list[dict]) -> list[str]:
    """The README's lines for the ship tables of one run: heading, what they say, the tables."""
    tables = format_ship_tables(rows, markdown=True)
    busy = _busy_left_out(rows)
    return (
        [f"### {HEADING}", "", INTRO, "", *([f"**{busy}.**", ""] if busy else []), tables, ""]
        if tables
        else []
    )
