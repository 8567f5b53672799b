"""The one look of lsr's charts: resolution, fonts, titles, legends, and a colour and marker per implementation.

Every chart in `lsr.bench.report.plot` takes its figure, its fonts, its titles and its line styles from here,
so that a colour names the same implementation in every chart of every run. The known registry
names have fixed entries; any other name gets a colour and a marker chosen by a stable hash of the
name (CRC-32, the same in every process, unlike Python's salted `hash`) from palettes that share
nothing with the fixed entries.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import lsr
import lsr.heads
from lsr.bench.data import FLOOR, FLOOR_ALLOC
from lsr.bench.report.selection import recorded_copy_bandwidth
from lsr.bench.report.tables import format_bandwidth, format_caches

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

# Each registered implementation's colour and marker is its `chart_style` (lsr.registry keeps the
# tab10 colours the charts always had; tab10's grey is left out: grey draws the reference lines).
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
FLOOR_LABEL = "floor: exp(z, out=buf)"  # the floor of in-place implementations
FLOOR_ALLOC_LABEL = "floor-alloc: exp(z)"  # into a new tensor: the floor of out-of-place ones
# The floors are black: dashed (in place), dash-dot (allocating), apart from the grey dotted references.
FLOORS = {
    FLOOR: {"color": "black", "linestyle": "--", "marker": "", "label": FLOOR_LABEL},
    FLOOR_ALLOC: {"color": "black", "linestyle": "-.", "marker": "", "label": FLOOR_ALLOC_LABEL},
}
# Where a floor is drawn as points (a size at a time), these tell the two apart.
FLOOR_MARKERS = {FLOOR: {"marker": "_", "markersize": 12}, FLOOR_ALLOC: {"marker": "x", "markersize": 7}}
REFERENCE = {"color": "grey", "linestyle": ":"}  # lines that are not measurements: 2 × floor, bytes
SPEEDUP_CMAP = "RdYlGn"


def line_style(name: str) -> dict:
    """Keyword arguments for `Axes.plot` that draw implementation `name` the same way in every chart.

    >>> line_style("native")
    {'color': '#1f77b4', 'marker': 'o', 'label': 'native'}
    >>> line_style("floor")
    {'color': 'black', 'linestyle': '--', 'marker': '', 'label': 'floor: exp(z, out=buf)'}
    >>> line_style("floor-alloc")["linestyle"]
    '-.'
    >>> line_style("my-new-loss")  # from the name's CRC-32: the same in every process and run
    {'color': '#2f4f4f', 'marker': 'p', 'label': 'my-new-loss'}
    >>> line_style("my-new-loss")["color"] in {i.chart_style[0] for i in lsr.REGISTRY.values() if i.chart_style}
    False
    """
    if name in FLOORS:
        return dict(FLOORS[name])
    impl = lsr.REGISTRY.get(name) or lsr.heads.HEAD_REGISTRY.get(name)
    color, marker = (impl.chart_style if impl is not None else None) or _hashed(name)
    return {"color": color, "marker": marker, "label": name}


def _hashed(name: str) -> tuple[str, str]:
    """A colour and a marker from the name's CRC-32: the same in every run and on every machine."""
    h = zlib.crc32(name.encode())
    return PALETTE[h % len(PALETTE)], MARKERS[h // len(PALETTE) % len(MARKERS)]


def title(what: str, metadata: dict, dtype: str | None = None, variant: str = "") -> str:
    """A chart's title: what it shows (and of which variant of the run's cases); the machine, dtype,
    torch version and threads; then what decides a CPU's ratios where the run recorded it: vector
    ISA, cache sizes, copy bandwidth.

    >>> title("time vs batch", {"device_name": "AMD EPYC", "torch_version": "2.5.0", "threads": 2}, "float32")
    'time vs batch\\nAMD EPYC · float32 · torch 2.5.0 · 2 threads'
    >>> print(title("run a", {"vector_isa": "avx2", "cache_bytes": {"L2": 2**20, "L3": 2**25},
    ...                       "copy_bandwidth_bytes_per_s": {"cpu": 9.87e9}}, variant="ignore 0.3"))
    run a — ignore 0.3
    ? · torch ? · ? threads
    avx2 · L2 1 MiB, L3 32 MiB · copy 9.87 GB/s
    """
    machine = metadata.get("device_name", metadata.get("device", "?"))
    parts = [machine, dtype, f"torch {metadata.get('torch_version', '?')}"]
    parts.append(f"{metadata.get('threads', '?')} threads")
    first = f"{what} — {variant}" if variant else what
    return "\n".join(
        line for line in (first, " · ".join(p for p in parts if p), hardware_line(metadata)) if line
    )


def hardware_line(metadata: dict) -> str:
    """Vector ISA and cache sizes (CPU runs only: a GPU run's are its host's) and the device's copy
    bandwidth; empty when the run recorded none of them.

    >>> hardware_line({"device": "cuda", "vector_isa": "avx512f", "copy_bandwidth_bytes_per_s": {"cuda": 4e12}})
    'copy 4000 GB/s'
    """
    cpu = metadata.get("device", "cpu") == "cpu"
    isa = metadata.get("vector_isa") if cpu and metadata.get("vector_isa") != "unknown" else None
    caches = format_caches(metadata.get("cache_bytes")) if cpu else ""
    copy = format_bandwidth(recorded_copy_bandwidth(metadata))
    return " · ".join(p for p in (isa, caches, f"copy {copy}" if copy else "") if p)


def legend_below(fig: Figure, columns: int) -> None:
    """One legend under the panels, each label once, in the order the panels first show it, in rows
    of at most `columns` entries, as even as they can be, and fewer where the rows would be wider
    than the figure."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:
        return
    rows = math.ceil(len(entries) / columns)
    for ncol in range(math.ceil(len(entries) / rows), 0, -1):
        legend = fig.legend(
            list(entries.values()), list(entries), loc="outside lower center", ncol=ncol, frameon=False
        )
        if ncol == 1 or legend.get_window_extent(fig.canvas.get_renderer()).width <= 0.98 * fig.bbox.width:
            return
        legend.remove()


@contextmanager
def context() -> Iterator[None]:
    """The fonts and grid of `RC`, for the figures drawn (and saved) inside the block."""
    with matplotlib.rc_context(RC):
        yield


def figure(width: float, height: float) -> Figure:
    """A blank figure of that size in inches, with constrained layout (legends placed outside fit),
    drawn by Agg (as the PNGs are), so that a legend can be measured before it is placed."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as a PNG at `DPI` (constrained layout has already fitted titles and legends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
