"""Two runs side by side: the ratio of medians per case, flagged where it exceeds the measured noise."""

from __future__ import annotations

from lsr.bench.grid import Case

KEY = ("implementation", "device", "dtype", "batch", "classes", "smoothing", "pass")


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def compare(old: list[dict], new: list[dict], min_change: float = 0.05) -> list[dict]:
    """One entry per case measured ok in both runs, with ratio = new / old median time.

    A change is flagged when the ratio leaves 1 by more than the two runs' relative IQRs added
    (the spread each run measured) and by more than `min_change`.
    """
    old_by_key = {_key(r): r for r in old if r["status"] == "ok"}
    entries = []
    for row in new:
        before = old_by_key.get(_key(row))
        if row["status"] != "ok" or before is None:
            continue
        ratio = row["median_s"] / before["median_s"]
        noise = (before["iqr_s"] or 0) / before["median_s"] + (row["iqr_s"] or 0) / row["median_s"]
        changed = abs(ratio - 1) > max(noise, min_change)
        verdict = ("slower" if ratio > 1 else "faster") if changed else ""
        entries.append(
            {
                "case": Case(*_key(row)),
                "old_s": before["median_s"],
                "new_s": row["median_s"],
                "ratio": ratio,
                "noise": noise,
                "verdict": verdict,
            }
        )
    return entries


def format_comparison(entries: list[dict]) -> str:
    header = f"{'implementation':<14} {'pass':<17} {'dtype':<9} {'N':>6} {'C':>7} {'old ms':>10} {'new ms':>10} {'new/old':>8} {'noise':>6}"
    lines = [header, "-" * len(header)]
    for e in entries:
        c = e["case"]
        lines.append(
            f"{c.implementation:<14} {c.pass_:<17} {c.dtype:<9} {c.batch:>6} {c.classes:>7} {e['old_s'] * 1e3:>10.3f} "
            f"{e['new_s'] * 1e3:>10.3f} {e['ratio']:>8.3f} {e['noise']:>6.1%} {e['verdict']}"
        )
    flagged = sum(1 for e in entries if e["verdict"])
    lines.append(f"\n{len(entries)} cases compared, {flagged} changed beyond the measured noise.")
    return "\n".join(lines)
