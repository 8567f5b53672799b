"""Charts and the generated results/README.md, from results.csv files (or pytest-benchmark JSON)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from lsr.bench.grid import FLOOR, PASSES
from lsr.bench.results import RESULTS_FILE, SchemaError, atomic_write, read_metadata, read_rows

MiB = 2**20
CHARTS = (
    "time_vs_batch",
    "time_vs_classes",
    "memory_vs_batch",
    "memory_vs_classes",
    "speedup",
    "floor_multiple",
)


def load(path: str | Path) -> tuple[list[dict], dict]:
    """Rows and metadata from a results directory, a results.csv, or a pytest-benchmark JSON file."""
    path = Path(path)
    if path.suffix == ".json":
        return _from_pytest_benchmark(path)
    return read_rows(path), read_metadata(path)


def _from_pytest_benchmark(path: Path) -> tuple[list[dict], dict]:
    try:
        data = json.loads(path.read_text())
        benchmarks, machine = data["benchmarks"], data.get("machine_info", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SchemaError(f"{path}: not a pytest-benchmark JSON file ({e})") from None
    rows = []
    for bench in benchmarks:
        info, stats = bench.get("extra_info", {}), bench["stats"]
        if "case" not in info:
            continue
        rows.append(
            info["case"]
            | {
                "median_s": stats["median"],
                "iqr_s": stats["iqr"],
                "runs": stats["rounds"] * stats.get("iterations", 1),
                "threads": info.get("threads"),
                "peak_bytes": info.get("peak_bytes"),
                "status": "ok",
                "message": "",
            }
        )
    if not rows:
        raise SchemaError(f"{path}: no lsr-bench cases in this pytest-benchmark file")
    metadata = {
        "device_name": machine.get("lsr_device_name", machine.get("cpu", {}).get("brand_raw", "?")),
        "torch_version": machine.get("torch_version", "?"),
        "source": "pytest-benchmark",
    }
    return rows, metadata


def _ok(rows):
    return [r for r in rows if r["status"] == "ok" and r["median_s"] is not None]


def _index(rows):
    return {(r["implementation"], r["pass"], r["dtype"], r["batch"], r["classes"]): r for r in _ok(rows)}


def _implementations(rows):
    seen = []
    for r in rows:
        if r["implementation"] not in seen and r["implementation"] != FLOOR:
            seen.append(r["implementation"])
    return seen


def _style(name: str, names: list[str]) -> dict:
    import matplotlib.pyplot as plt

    if name == FLOOR:
        return {"color": "black", "linestyle": "--", "marker": "", "label": "floor: exp(z, out=buf)"}
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*X"
    i = names.index(name)
    return {"color": colors[i % 10], "marker": markers[i % len(markers)], "label": name}


def _title(metadata: dict, dtype: str, what: str) -> str:
    name = metadata.get("device_name", metadata.get("device", "?"))
    return f"{what}\n{name} · {dtype} · torch {metadata.get('torch_version', '?')} · {metadata.get('threads', '?')} threads"


def _line_grid(rows, metadata, dtype, x_axis, y_of, ylabel, what, path, reference=None):
    """Rows of panels = passes, columns = values of the other size axis; a line per implementation."""
    import matplotlib.pyplot as plt

    panel_axis = "classes" if x_axis == "batch" else "batch"
    index = _index(rows)
    names = _implementations(rows)
    panels = sorted({r[panel_axis] for r in _ok(rows) if r["dtype"] == dtype})
    xs = sorted({r[x_axis] for r in _ok(rows) if r["dtype"] == dtype})
    if not panels or not xs:
        return None
    fig, axes = plt.subplots(
        len(PASSES), len(panels), figsize=(3.6 * len(panels) + 1, 3.0 * len(PASSES) + 1), squeeze=False
    )
    for i, pass_ in enumerate(PASSES):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            for name in [*names, FLOOR] if reference == FLOOR else names:
                key_pass = "forward+backward" if name == FLOOR else pass_
                points = []
                for x in xs:
                    size = {x_axis: x, panel_axis: panel}
                    row = index.get((name, key_pass, dtype, size["batch"], size["classes"]))
                    if row is not None and y_of(row) is not None:
                        points.append((x, y_of(row)))
                if points:
                    ax.plot(*zip(*points, strict=False), **_style(name, names))
            if reference == "gradient":
                grads = [(x, x * panel * _itemsize(rows, dtype)) for x in xs]
                ax.plot(
                    *zip(*grads, strict=False),
                    color="grey",
                    linestyle=":",
                    label="gradient bytes (N·C·itemsize)",
                )
            ax.set_xscale("log", base=2 if x_axis == "batch" else 10)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{pass_}, {'C' if panel_axis == 'classes' else 'N'} = {panel}", fontsize=9)
            if i == len(PASSES) - 1:
                ax.set_xlabel("batch size N" if x_axis == "batch" else "classes C")
            if j == 0:
                ax.set_ylabel(ylabel)
    handles, labels = axes[-1][-1].get_legend_handles_labels()
    columns = min(len(labels), 2 * len(panels) + 1)  # what fits under the panels
    legend_rows = math.ceil(len(labels) / columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    fig.suptitle(_title(metadata, dtype, what), fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * legend_rows, 1, 0.95))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _itemsize(rows, dtype):
    for r in rows:
        if r["dtype"] == dtype:
            return r["logits_bytes"] / (r["batch"] * r["classes"])
    return 4


def _speedup_heatmaps(rows, metadata, dtype, path):
    """fwd+bwd speedup over the N x C grid: sparse vs dense, and every implementation vs native."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    index = _index(rows)
    names = _implementations(rows)
    pairs = [("sparse", "dense")] if {"sparse", "dense"} <= set(names) else []
    pairs += [(name, "native") for name in names if name != "native" and "native" in names]
    batches = sorted({r["batch"] for r in _ok(rows) if r["dtype"] == dtype})
    classes = sorted({r["classes"] for r in _ok(rows) if r["dtype"] == dtype})
    if not pairs or not batches:
        return None
    cols = min(3, len(pairs))
    rows_of_panels = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(
        rows_of_panels,
        cols,
        figsize=(4.2 * cols + 1.5, (0.5 * len(batches) + 2.4) * rows_of_panels + 1),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    norm = LogNorm(vmin=1 / 8, vmax=8)
    for ax, (fast, slow) in zip(axes.flat, pairs, strict=False):
        grid = [[math.nan] * len(classes) for _ in batches]
        for i, n in enumerate(batches):
            for j, c in enumerate(classes):
                a = index.get((fast, "forward+backward", dtype, n, c))
                b = index.get((slow, "forward+backward", dtype, n, c))
                if a and b:
                    grid[i][j] = b["median_s"] / a["median_s"]
        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower", aspect="auto")
        for i in range(len(batches)):
            for j in range(len(classes)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}×", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], fontsize=8)
        ax.set_yticks(range(len(batches)), [str(n) for n in batches], fontsize=8)
        ax.set_xlabel("classes C")
        ax.set_ylabel("batch size N")
        ax.set_title(f"{fast} vs {slow}", fontsize=10)
    bar = fig.colorbar(
        image, ax=axes.flat[: len(pairs)], shrink=0.8, label="speedup: time of the second / time of the first"
    )
    ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
    bar.set_ticks(ticks, labels=[f"{t:g}×" if t >= 1 else f"1/{1 / t:g}×" for t in ticks])
    bar.minorticks_off()
    fig.suptitle(
        _title(metadata, dtype, "forward+backward speedup (green: the first is faster)"), fontsize=11
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _floor_multiple(rows, metadata, dtype, path):
    """fwd+bwd time / floor time against the number of logits N·C."""
    import matplotlib.pyplot as plt

    index = _index(rows)
    names = _implementations(rows)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for name in names:
        points = []
        for r in _ok(rows):
            if r["implementation"] == name and r["pass"] == "forward+backward" and r["dtype"] == dtype:
                floor = index.get((FLOOR, "forward+backward", dtype, r["batch"], r["classes"]))
                if floor:
                    points.append((r["batch"] * r["classes"], r["median_s"] / floor["median_s"]))
        if points:
            ax.plot(*zip(*sorted(points), strict=False), linestyle="none", alpha=0.85, **_style(name, names))
    ax.axhline(1, color="black", linestyle="--", label="floor: exp(z, out=buf)")
    ax.axhline(2, color="grey", linestyle=":", label="2 × floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("logits N·C")
    ax.set_ylabel("forward+backward time / floor time")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(_title(metadata, dtype, "time as a multiple of the floor"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows split by (device, smoothing), each with its device's floor rows, and a file-name suffix.

    Charts and tables index rows by implementation, pass, dtype and size, so each must see one
    device and one smoothing. The suffix is empty when the run has just one of each.
    """
    keys = sorted({(r["device"], r["smoothing"]) for r in rows if r["implementation"] != FLOOR})
    split = []
    for device, smoothing in keys:
        subset = [
            r
            for r in rows
            if r["device"] == device and (r["implementation"] == FLOOR or r["smoothing"] == smoothing)
        ]
        suffix = "" if len(keys) == 1 else f"_{device}_smoothing{smoothing:g}"
        split.append((suffix, subset))
    return split


def plot_run(rows: list[dict], metadata: dict, out_dir: Path) -> list[Path]:
    """Every chart for one run, per dtype (and per device and smoothing where it has several)."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, subset in variants(rows):
        written += _plot_variant(subset, metadata, out_dir, suffix)
    return written


def _plot_variant(rows: list[dict], metadata: dict, out_dir: Path, suffix: str) -> list[Path]:
    written = []
    seconds = lambda r: r["median_s"]  # noqa: E731
    for dtype in sorted({r["dtype"] for r in _ok(rows)}):
        for x_axis in ("batch", "classes"):
            written.append(
                _line_grid(
                    rows,
                    metadata,
                    dtype,
                    x_axis,
                    seconds,
                    "median time (s)",
                    f"time vs {x_axis}",
                    out_dir / f"time_vs_{x_axis}_{dtype}{suffix}.png",
                    reference=FLOOR,
                )
            )
            written.append(
                _line_grid(
                    rows,
                    metadata,
                    dtype,
                    x_axis,
                    lambda r: r["peak_bytes"] or None,
                    "peak allocated above inputs (bytes)",
                    f"peak memory vs {x_axis}",
                    out_dir / f"memory_vs_{x_axis}_{dtype}{suffix}.png",
                    reference="gradient",
                )
            )
        written.append(_speedup_heatmaps(rows, metadata, dtype, out_dir / f"speedup_{dtype}{suffix}.png"))
        written.append(
            _floor_multiple(rows, metadata, dtype, out_dir / f"floor_multiple_{dtype}{suffix}.png")
        )
    return [p for p in written if p is not None]


def plot_side_by_side(sources: list[tuple[str, list[dict], dict]], out_path: Path) -> Path:
    """fwd+bwd time against N·C, a panel per source (machine or device), same implementations' colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for _, rows, _ in sources:
        names += [n for n in _implementations(rows) if n not in names]
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.6), squeeze=False, sharey=True)
    for ax, (label, rows, metadata) in zip(axes[0], sources, strict=False):
        for name in [*names, FLOOR]:
            by_size = defaultdict(list)
            for r in _ok(rows):
                if r["implementation"] == name and r["pass"] == "forward+backward":
                    by_size[r["batch"] * r["classes"]].append(r["median_s"])
            if by_size:
                xs = sorted(by_size)
                ax.plot(xs, [min(by_size[x]) for x in xs], **_style(name, names))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("logits N·C")
        ax.set_title(
            f"{label}\n{metadata.get('device_name', '?')}, torch {metadata.get('torch_version', '?')}",
            fontsize=9,
        )
    axes[0][0].set_ylabel("forward+backward median time (s)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# --- the generated summary ------------------------------------------------------------------------


def representative_sizes(rows: list[dict], dtype: str) -> list[tuple[int, int]]:
    """The smallest, a middle and the largest N·C measured (by the floor rows, which every size has)."""
    sizes = sorted(
        {(r["batch"], r["classes"]) for r in _ok(rows) if r["dtype"] == dtype}, key=lambda s: s[0] * s[1]
    )
    if len(sizes) <= 3:
        return sizes
    return [sizes[0], sizes[len(sizes) // 2], sizes[-1]]


def summary_table(rows: list[dict], dtype: str) -> list[str]:
    index = _index(rows)
    lines = [
        "| N | C | implementation | fwd+bwd median (ms) | IQR (ms) | × floor | speedup vs native | speedup vs dense | peak (MiB) | peak / gradient bytes |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, c in representative_sizes(rows, dtype):
        floor = index.get((FLOOR, "forward+backward", dtype, n, c))
        native = index.get(("native", "forward+backward", dtype, n, c))
        dense = index.get(("dense", "forward+backward", dtype, n, c))
        for name in [*_implementations(rows), FLOOR]:
            r = index.get((name, "forward+backward", dtype, n, c))
            if r is None:
                continue
            cells = [
                str(n),
                str(c),
                name if name != FLOOR else "floor (exp)",
                f"{r['median_s'] * 1e3:.3f}",
                f"{r['iqr_s'] * 1e3:.3f}",
                f"{r['median_s'] / floor['median_s']:.2f}" if floor else "",
                f"{native['median_s'] / r['median_s']:.2f}" if native and name != FLOOR else "",
                f"{dense['median_s'] / r['median_s']:.2f}" if dense and name != FLOOR else "",
                f"{r['peak_bytes'] / MiB:.1f}" if r["peak_bytes"] is not None else "",
                f"{r['peak_bytes'] / r['logits_bytes']:.2f}" if r["peak_bytes"] is not None else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(results_root: Path) -> Path:
    """results/README.md: for every run directory under results_root, its environment, table and charts."""
    lines = [
        "# Results",
        "",
        "Generated by `lsr-bench plot` from the runs below; do not edit by hand. Each directory holds",
        "`results.csv` (a row per case; schema in `src/lsr/bench/results.py`), `metadata.json` (the",
        "machine and commit) and the charts. Times are medians of one call with the interquartile range;",
        "speedups and floor multiples are ratios of medians measured in the same run. The floor is",
        "`torch.exp(z, out=buf)` on the same logits: one read, one write and one exp per element, the",
        "least a fused forward+backward must do. Peak memory is bytes allocated above what existed before",
        "the pass (CUDA: `max_memory_allocated`; CPU: the exact peak from the profiler's allocation events).",
        "",
    ]
    for run_dir in sorted(p.parent for p in results_root.glob(f"*/{RESULTS_FILE}")):
        rows, metadata = load(run_dir)
        rel = run_dir.relative_to(results_root)
        lines += [f"## {rel}: {metadata.get('device_name', '?')}", ""]
        lines += [
            "| | |",
            "|---|---|",
            *(
                f"| {k} | {metadata.get(k)} |"
                for k in (
                    "device_name",
                    "cpu_model",
                    "threads",
                    "torch_version",
                    "cuda_version",
                    "triton_version",
                    "python_version",
                    "git_commit",
                    "date",
                    "preset",
                    "command",
                )
                if metadata.get(k) is not None
            ),
            "",
        ]
        counts = defaultdict(int)
        for r in rows:
            counts[r["status"]] += 1
        lines += [f"Cases: {len(rows)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}).", ""]
        for suffix, subset in variants(rows):
            for dtype in sorted({r["dtype"] for r in _ok(subset)}):
                where = f" ({suffix.strip('_').replace('_', ', ')})" if suffix else ""
                lines += [
                    f"### {dtype}{where}, forward+backward at representative sizes",
                    "",
                    *summary_table(subset, dtype),
                    "",
                ]
                for chart in CHARTS:
                    name = f"{chart}_{dtype}{suffix}.png"
                    if (run_dir / name).exists():
                        lines.append(f"![{chart} {dtype}{where}]({rel}/{name})")
                lines.append("")
        failures = [r for r in rows if r["status"] != "ok"]
        if failures:
            lines += [
                "Cases that did not complete:",
                "",
                "| implementation | pass | dtype | N | C | status | message |",
                "|---|---|---|---:|---:|---|---|",
            ]
            lines += [
                f"| {r['implementation']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['classes']} | {r['status']} | {r['message'].replace('|', '/')} |"
                for r in failures
            ]
            lines.append("")
    if (results_root / "experiments" / "README.md").exists():
        lines += ["## The paper's experiments", "", "See [experiments/README.md](experiments/README.md).", ""]
    path = results_root / "README.md"
    atomic_write(path, "\n".join(lines))
    return path
