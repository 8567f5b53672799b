"""One table formatter for the console and for Markdown, so every table in lsr reads the same way."""

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
