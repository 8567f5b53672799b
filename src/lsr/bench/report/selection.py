"""Which rows a chart or a table shows: the measured ones, indexed by case; the implementations in run
order; the floor each is measured against; the bandwidth a row achieved; one variant (device,
smoothing, ignore fraction, weighting) at a time; the rows at all cores, and how each case scaled
from one thread to them; and the chart files' names.

`lsr.bench.report.plot`, `lsr.bench.report.summary` and `lsr.bench.report.ship` all select through here, so the charts and
the tables always show the same rows.
"""

from __future__ import annotations

from typing import NamedTuple

from lsr.bench.data import ALL_FLOORS, FWD_BWD

MiB = 2**20
CHARTS = (
    "time_vs_batch",
    "time_vs_classes",
    "memory_vs_batch",
    "memory_vs_classes",
    "speedup",
    "floor_multiple",
    "bandwidth",
    "thread_scaling",
)
IndexKey = tuple[str, str, str, int, int]  # implementation, pass, dtype, batch, classes
# What splits a run into variants: a chart or table shows one of each, so rows of two never mix.
VARIANT_AXES = ("device", "smoothing", "ignore_fraction", "weighted")

# --- selecting rows ---------------------------------------------------------------------------------


def ok_rows(rows: list[dict]) -> list[dict]:
    """The rows that hold a measurement."""
    return [r for r in rows if r["status"] == "ok" and r["median_s"] is not None]


def index_rows(rows: list[dict]) -> dict[IndexKey, dict]:
    """The measured rows by (implementation, pass, dtype, batch, classes), for one variant."""
    return {(r["implementation"], r["pass"], r["dtype"], r["batch"], r["classes"]): r for r in ok_rows(rows)}


def is_floor(row: dict) -> bool:
    return row["implementation"] in ALL_FLOORS


def implementations(rows: list[dict]) -> list[str]:
    """The implementations in the order the run measured them, without the floors."""
    return list(dict.fromkeys(r["implementation"] for r in rows if not is_floor(r)))


def dtypes(rows: list[dict]) -> list[str]:
    """The dtypes at which an implementation (not only a floor) has a measurement, sorted."""
    return sorted({r["dtype"] for r in ok_rows(rows) if not is_floor(r)})


def recorded_copy_bandwidth(metadata: dict, device: str | None = None) -> float | None:
    """The copy bandwidth (bytes/s) the run measured on `device` (default: the run's), from
    metadata.json's copy_bandwidth_bytes_per_s, one number per device; None where it has none.

    >>> recorded_copy_bandwidth({"device": "cuda", "copy_bandwidth_bytes_per_s": {"cuda": 4e12}})
    4000000000000.0
    >>> recorded_copy_bandwidth({"device": "cpu", "copy_bandwidth_bytes_per_s": {"cpu": None}}) is None
    True
    """
    value = metadata.get("copy_bandwidth_bytes_per_s")
    if isinstance(value, dict):
        value = value.get(device or metadata.get("device", "cpu"))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def achieved_bandwidth(r: dict, metadata: dict | None = None) -> tuple[float | None, float | None]:
    """Bytes per second of the least traffic a forward+backward makes (the logits read, their gradient
    written: 2 · logits bytes), and that as a fraction of the machine's copy bandwidth; for measured
    forward+backward and floor rows, from their columns or, in a file older than them, computed; none
    for a head row (`hidden`), which need never hold its logits."""
    if r["status"] != "ok" or r["pass"] != FWD_BWD or r["median_s"] is None or r.get("hidden"):
        return None, None
    achieved = r.get("bandwidth_bytes_per_s") or 2 * r["logits_bytes"] / r["median_s"]
    copy = recorded_copy_bandwidth(metadata or {}, r["device"])
    fraction = r.get("bandwidth_fraction")
    return achieved, fraction if fraction is not None else (achieved / copy if copy else None)


def at_all_cores(rows: list[dict]) -> list[dict]:
    """The rows measured at the largest thread count of their machine and device (every core, unless
    the run was told otherwise): what the charts and tables other than the threads chart show, so
    that a case measured at 1 thread and at all cores appears once. Rows without a count are kept.

    >>> rows = [{"machine": "m", "device": "cpu", "threads": t, "implementation": "native"} for t in (1, 2)]
    >>> [r["threads"] for r in at_all_cores(rows)]
    [2]
    """
    most: dict[tuple, int] = {}
    for r in rows:
        if r.get("threads") is not None:
            group = (r.get("machine") or "", r["device"])
            most[group] = max(most.get(group, 0), r["threads"])
    return [
        r
        for r in rows
        if r.get("threads") is None or r["threads"] == most[(r.get("machine") or "", r["device"])]
    ]


class Scaling(NamedTuple):
    """How one forward+backward case scaled: its median at one thread over its median at `threads`."""

    one: dict  # the 1-thread row
    many: dict  # the row at `threads`
    threads: int

    @property
    def speedup(self) -> float:
        return self.one["median_s"] / self.many["median_s"]

    @property
    def efficiency(self) -> float:
        """speedup / threads: 1 is perfect scaling."""
        return self.speedup / self.threads


def thread_scaling(rows: list[dict]) -> dict[tuple, list[Scaling]]:
    """For each measured forward+backward case (by its key without threads) that has a 1-thread row,
    its scaling to every other thread count measured, fewest threads first.

    >>> row = {"status": "ok", "pass": FWD_BWD, "implementation": "floor", "device": "cpu",
    ...        "dtype": "float32", "batch": 8, "classes": 4, "smoothing": 0.1}
    >>> rows = [row | {"threads": 1, "median_s": 3.0}, row | {"threads": 2, "median_s": 2.0}]
    >>> rows[1]["smoothing"] = 0.0  # a floor's smoothing is unused: the two still pair
    >>> [(s.threads, s.speedup, s.efficiency) for s in thread_scaling(rows)[("floor", "cpu", "float32", 8, 4, None, FWD_BWD, 0.0, False)]]
    [(2, 1.5, 0.75)]
    """
    by_case: dict[tuple, dict[int, dict]] = {}
    for r in ok_rows(rows):
        if r["pass"] == FWD_BWD and r.get("threads") is not None:
            by_case.setdefault(_key_but_threads(r), {})[r["threads"]] = r
    return {
        key: [Scaling(counts[1], counts[t], t) for t in sorted(counts) if t != 1]
        for key, counts in by_case.items()
        if 1 in counts and len(counts) > 1
    }


def scaling_of(r: dict, scaling: dict[tuple, list[Scaling]]) -> Scaling | None:
    """r's scaling from one thread to r's own thread count, where the run measured both."""
    return next((s for s in scaling.get(_key_but_threads(r), []) if s.threads == r.get("threads")), None)


def _key_but_threads(r: dict) -> tuple:
    """r's case key without its thread count (a row older than ignore_fraction and weighted: 0, False),
    and for a floor without its smoothing, which it does not use: a size's floors at two thread counts
    may have been recorded under two grids' first smoothing values."""
    smoothing = None if is_floor(r) else r["smoothing"]
    case = (r["implementation"], r["device"], r["dtype"], r["batch"], r["classes"], smoothing, r["pass"])
    return (*case, r.get("ignore_fraction") or 0.0, bool(r.get("weighted")))


def variant_of(r: dict) -> tuple:
    """r's value of each of VARIANT_AXES (a row written before ignore_fraction and weighted: 0, False)."""
    return r["device"], r["smoothing"], r.get("ignore_fraction") or 0.0, bool(r.get("weighted"))


def _parts(key: tuple, axes: list[int]) -> list[tuple[str, str | None]]:
    """(words, file-name part) of key's value on each of `axes`; no file-name part for the values a
    run measures first (no ignored targets, no weights), so that its main charts keep short names."""
    device, smoothing, ignore_fraction, weighted = key
    parts = (
        (device, device),
        (f"smoothing {smoothing:g}", f"smoothing{smoothing:g}"),
        (f"ignore {ignore_fraction:g}", f"ignore{ignore_fraction:g}" if ignore_fraction else None),
        ("weighted" if weighted else "unweighted", "weighted" if weighted else None),
    )
    return [parts[i] for i in axes]


def variant_suffix(r: dict, axes: list[int]) -> str:
    """A file-name suffix naming r's value on each axis of `axes` (positions in VARIANT_AXES) where
    it is not the default (ignore 0, unweighted).

    >>> variant_suffix({"device": "cpu", "smoothing": 0.1, "weighted": True}, [0, 1, 2, 3])
    '_cpu_smoothing0.1_weighted'
    """
    return "".join(f"_{part}" for _, part in _parts(variant_of(r), axes) if part)


def variant_label(r: dict, axes: list[int]) -> str:
    """r's value on each axis of `axes` in words.

    >>> variant_label({"device": "cpu", "smoothing": 0.1, "ignore_fraction": 0.3}, [1, 2, 3])
    'smoothing 0.1, ignore 0.3, unweighted'
    """
    return ", ".join(words for words, _ in _parts(variant_of(r), axes))


def varying_axes(rows: list[dict]) -> list[int]:
    """The positions in VARIANT_AXES of the axes on which the rows (not the floors) take more than one value."""
    keys = {variant_of(r) for r in rows if not is_floor(r)}
    return [i for i in range(len(VARIANT_AXES)) if len({k[i] for k in keys}) > 1]


class Variant(NamedTuple):
    suffix: str  # for file names: empty when the run has one variant
    label: str  # in words: empty when the run has one variant
    rows: list[dict]  # the variant's rows and its device's floors


def variants(rows: list[dict]) -> list[Variant]:
    """Rows split by (device, smoothing, ignore_fraction, weighted), each with its device's floor
    rows, a file-name suffix and a label naming its values on the axes where the run has more than one.

    Charts and tables index rows by implementation, pass, dtype and size, so each must see one
    variant. The suffix and label are empty when the run has just one.

    >>> rows = [{"device": "cpu", "smoothing": s, "implementation": i, "ignore_fraction": f}
    ...         for s, i, f in [(0.1, "floor", 0), (0.1, "native", 0), (0, "native", 0), (0.1, "native", 0.3)]]
    >>> [(v.suffix, v.label, len(v.rows)) for v in variants(rows)]  # doctest: +NORMALIZE_WHITESPACE
    [('_smoothing0', 'smoothing 0, ignore 0', 2), ('_smoothing0.1', 'smoothing 0.1, ignore 0', 2),
     ('_smoothing0.1_ignore0.3', 'smoothing 0.1, ignore 0.3', 2)]
    """
    axes = varying_axes(rows)
    split = []
    for key in sorted({variant_of(r) for r in rows if not is_floor(r)}):
        subset = [r for r in rows if r["device"] == key[0] and (is_floor(r) or variant_of(r) == key)]
        named = dict(zip(VARIANT_AXES, key, strict=True))
        split.append(Variant(variant_suffix(named, axes), variant_label(named, axes), subset))
    return split


def chart_file(chart: str, dtype: str, suffix: str = "") -> str:
    """The file name of one of the `CHARTS` for a dtype and a variant's suffix.

    >>> chart_file("speedup", "float32")
    'speedup_float32.png'
    """
    return f"{chart}_{dtype}{suffix}.png"


def ratio(numerator: dict | None, denominator: dict | None) -> str:
    """numerator's median / denominator's, two decimals; empty where either is missing."""
    if numerator is None or denominator is None:
        return ""
    return f"{numerator['median_s'] / denominator['median_s']:.2f}"
