"""Two runs side by side: the ratio of medians per case, flagged where it exceeds the measured noise."""

from __future__ import annotations

from lsr.bench.data import Case, case_key
from lsr.bench.measure.timing import relative_iqr
from lsr.bench.report.tables import format_table


def compare(
    old: list[dict], new: list[dict], min_change: float = 0.05, ignore_busy: bool = False
) -> list[dict]:
    """One entry per case measured ok in both runs, with ratio = new / old median time.

    A change is flagged when the ratio leaves 1 by more than the two runs' relative IQRs added
    (the spread each run measured) and by more than `min_change`. A case timed on a busy machine in
    either run (column busy) is left out when `ignore_busy`, else its entry says busy=True.
    """
    old_by_key = {case_key(r): r for r in old if r["status"] == "ok"}
    entries = []
    for row in new:
        before = old_by_key.get(case_key(row))
        if row["status"] != "ok" or before is None:
            continue
        busy = bool(before.get("busy") or row.get("busy"))
        if busy and ignore_busy:
            continue
        ratio = row["median_s"] / before["median_s"]
        noise = relative_iqr(before["median_s"], before["iqr_s"]) + relative_iqr(
            row["median_s"], row["iqr_s"]
        )
        changed = abs(ratio - 1) > max(noise, min_change)
        verdict = ("slower" if ratio > 1 else "faster") if changed else ""
        entries.append(
            {
                "case": Case.of_row(row),
                "old_s": before["median_s"],
                "new_s": row["median_s"],
                "ratio": ratio,
                "noise": noise,
                "verdict": verdict,
                "busy": busy,
            }
        )
    return entries


# Case fields beside implementation, pass, dtype, N and C that get a column where the entries differ
# in them (two rows of one size at smoothing 0 and 0.1 would otherwise read as one case twice)
VARYING = {
    "smoothing": "smoothing",
    "hidden": "H",
    "ignore_fraction": "ignored",
    "weighted": "weighted",
    "threads": "threads",
}


def _cell(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"


def format_comparison(entries: list[dict]) -> str:
    varying = [f for f in VARYING if len({getattr(e["case"], f) for e in entries}) > 1]
    headers = ["implementation", "pass", "dtype", "N", "C", *(VARYING[f] for f in varying)]
    headers += ["old ms", "new ms", "new/old", "noise", ""]
    rows = [
        [
            e["case"].implementation,
            e["case"].pass_,
            e["case"].dtype,
            e["case"].batch,
            e["case"].classes,
            *(_cell(getattr(e["case"], f)) for f in varying),
            f"{e['old_s'] * 1e3:.3f}",
            f"{e['new_s'] * 1e3:.3f}",
            f"{e['ratio']:.3f}",
            f"{e['noise']:.1%}",
            " ".join(filter(None, [e["verdict"], "busy" if e.get("busy") else ""])),
        ]
        for e in entries
    ]
    flagged = sum(1 for e in entries if e["verdict"])
    busy = sum(1 for e in entries if e.get("busy"))
    table = format_table(headers, rows, align="lllrr" + "r" * len(varying) + "rrrrl")
    summary = f"{len(entries)} cases compared, {flagged} changed beyond the measured noise."
    if busy:
        summary += f" {busy} were timed on a busy machine (marked busy): their times may be inflated."
    return f"{table}\n\n{summary}"


# What decides a run's times besides the code: a difference in any says the runs' ratios compare
# machines (or settings), not commits
MACHINE_FACTS = ("machine", "cpu_model", "vector_isa", "device_name", "threads", "torch_version")


def machine_difference(old: dict, new: dict) -> str | None:
    """A sentence saying how two runs' machines differ (from their metadata), or None.

    >>> machine_difference({"vector_isa": "avx2", "threads": 2}, {"vector_isa": "avx512f", "threads": 2})
    'measured on different machines (vector_isa avx2 -> avx512f): the ratios compare machines as well as code; hosts of one kind differ by 2-4x'
    """
    changed = [
        f"{key} {old.get(key)} -> {new.get(key)}"
        for key in MACHINE_FACTS
        if old.get(key) is not None and new.get(key) is not None and old[key] != new[key]
    ]
    if not changed:
        return None
    return (
        f"measured on different machines ({', '.join(changed)}): the ratios compare machines as well as "
        "code; hosts of one kind differ by 2-4x"
    )
