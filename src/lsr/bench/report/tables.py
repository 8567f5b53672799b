"""One table formatter for the console and for Markdown, so every table in lsr reads the same way;
and the few quantities that tables and chart titles both write (bytes, caches, bandwidth)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, markdown: bool = False, align: str = ""
) -> str:
    """Rows of cells under headers. `align` has one letter per column, "l" or "r" (default: numbers
    right, text left, judged from the first row). Markdown: a pipe table; otherwise padded columns.

    Example:
        >>> print(format_table(["name", "ms"], [["native", "1.50"], ["fused", "0.75"]]))
        name      ms
        ------  ----
        native  1.50
        fused   0.75
        >>> print(format_table(["name", "ms"], [["native", "1.50"]], markdown=True))
        | name | ms |
        |---|---:|
        | native | 1.50 |
    """
    cells = [[_text(c) for c in row] for row in rows]
    if not align:
        first = cells[0] if cells else [""] * len(headers)
        align = "".join("r" if _is_number(c) else "l" for c in first)
    if markdown:
        rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
        lines = ["| " + " | ".join(headers) + " |", rule]
        return "\n".join(
            lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        )
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in cells)])


def _text(cell: object) -> str:
    return "" if cell is None else str(cell)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("×x%"))
    except ValueError:
        return False
    return True


def format_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it at least 1, to three significant digits.

    >>> [format_bytes(n) for n in (512, 49152, 2**20, 1.5 * 2**20, 1000 * 2**20, 3 * 2**30)]
    ['512 B', '48 KiB', '1 MiB', '1.5 MiB', '1000 MiB', '3 GiB']
    """
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{_significant(n / size)} {unit}"
    return f"{n:.0f} B"


def format_caches(cache_bytes: dict | None, levels: Sequence[str] = ("L2", "L3")) -> str:
    """The cache sizes a CPU's ratios turn on, compactly; empty where none is known.

    >>> format_caches({"L1d": 49152, "L2": 2**20, "L3": 32 * 2**20})
    'L2 1 MiB, L3 32 MiB'
    >>> format_caches({"L1d": 49152, "L2": 2**20}, levels=("L1d", "L2", "L3"))
    'L1d 48 KiB, L2 1 MiB'
    """
    sizes = cache_bytes or {}
    return ", ".join(f"{level} {format_bytes(sizes[level])}" for level in levels if sizes.get(level))


def format_bandwidth(bytes_per_s: float | None) -> str:
    """Bytes per second as GB/s (10^9, as bandwidths are quoted), three significant digits.

    >>> format_bandwidth(12.34e9), format_bandwidth(4321e9), format_bandwidth(None)
    ('12.3 GB/s', '4321 GB/s', '')
    """
    return "" if not bytes_per_s else f"{_significant(bytes_per_s / 1e9)} GB/s"


def _significant(x: float) -> str:
    """Three significant digits, without an exponent: 4.79, 47.9, 479, 4790."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"
