"""The one look of lsr's charts: resolution, font sizes, titles, and a colour and marker per implementation.

Every chart in `lsr.bench.plot` takes its figure, its fonts, its titles and its line styles from here,
so that a colour names the same implementation in every chart of every run. The known registry
names have fixed entries; any other name gets a colour and a marker chosen by a stable hash of the
name (CRC-32, the same in every process, unlike Python's salted `hash`) from palettes that share
nothing with the fixed entries.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from lsr.bench.results import FLOOR

DPI = 110
ANNOTATION_SIZE = 8  # the numbers written inside heatmap cells
RC = {
    "font.size": 10,
    "axes.titlesize": 9.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 11,
    "grid.alpha": 0.3,
}

# name -> (colour, marker). The first six are the registry's names today, in matplotlib's tab10
# order, so the charts keep the colours they always had; the next three are held for names to come.
# tab10's grey (#7f7f7f) is left out: grey draws the reference lines.
FIXED: dict[str, tuple[str, str]] = {
    "native": ("#1f77b4", "o"),
    "dense": ("#ff7f0e", "s"),
    "sparse": ("#2ca02c", "D"),
    "fused-exact": ("#d62728", "^"),
    "fused-sparse": ("#9467bd", "v"),
    "fused-exact-inplace": ("#8c564b", "P"),
    "native-compiled": ("#e377c2", "*"),
    "liger": ("#bcbd22", "X"),
    "fused-exact-onepass": ("#17becf", "h"),
}
# For other names: dark, saturated colours, apart from tab10's mid tones above, and markers that no
# fixed entry uses, so that a new name is told apart by its marker even where a hue comes near.
PALETTE = (
    "#000080",  # navy
    "#008080",  # teal
    "#800000",  # maroon
    "#4b0082",  # indigo
    "#b8860b",  # dark goldenrod
    "#ff1493",  # deep pink
    "#556b2f",  # dark olive green
    "#2f4f4f",  # dark slate grey
)
MARKERS = ("p", "d", "<", ">", "8", "H")
FLOOR_LABEL = "floor: exp(z, out=buf)"
REFERENCE = {"color": "grey", "linestyle": ":"}  # lines that are not measurements: 2 × floor, bytes
SPEEDUP_CMAP = "RdYlGn"


def line_style(name: str) -> dict:
    """Keyword arguments for `Axes.plot` that draw implementation `name` the same way in every chart.

    >>> line_style("native")
    {'color': '#1f77b4', 'marker': 'o', 'label': 'native'}
    >>> line_style("floor")
    {'color': 'black', 'linestyle': '--', 'marker': '', 'label': 'floor: exp(z, out=buf)'}
    >>> line_style("my-new-loss")  # from the name's CRC-32: the same in every process and run
    {'color': '#2f4f4f', 'marker': 'p', 'label': 'my-new-loss'}
    >>> line_style("my-new-loss")["color"] in {color for color, _ in FIXED.values()}
    False
    """
    if name == FLOOR:
        return {"color": "black", "linestyle": "--", "marker": "", "label": FLOOR_LABEL}
    color, marker = FIXED.get(name) or _hashed(name)
    return {"color": color, "marker": marker, "label": name}


def _hashed(name: str) -> tuple[str, str]:
    """A colour and a marker from the name's CRC-32: the same in every run and on every machine."""
    h = zlib.crc32(name.encode())
    return PALETTE[h % len(PALETTE)], MARKERS[h // len(PALETTE) % len(MARKERS)]


def title(what: str, metadata: dict, dtype: str | None = None) -> str:
    """A chart's title: what it shows, then the machine, dtype, torch version and threads.

    >>> title("time vs batch", {"device_name": "AMD EPYC", "torch_version": "2.5.0", "threads": 2}, "float32")
    'time vs batch\\nAMD EPYC · float32 · torch 2.5.0 · 2 threads'
    >>> title("run a", {})
    'run a\\n? · torch ? · ? threads'
    """
    machine = metadata.get("device_name", metadata.get("device", "?"))
    parts = [machine, dtype, f"torch {metadata.get('torch_version', '?')}"]
    parts.append(f"{metadata.get('threads', '?')} threads")
    return f"{what}\n" + " · ".join(p for p in parts if p)


@contextmanager
def context() -> Iterator[None]:
    """The fonts and grid of `RC`, for the figures drawn (and saved) inside the block."""
    with matplotlib.rc_context(RC):
        yield


def figure(width: float, height: float) -> Figure:
    """A blank figure of that size in inches, with constrained layout (legends placed outside fit)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as a PNG at `DPI` (constrained layout has already fitted titles and legends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
