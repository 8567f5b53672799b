"""What `lsr-train` writes: the t-SNE figure, the runs CSV, the summary JSON and its Markdown.

Every file is named train_<dataset>_<kind> (`output_path`): _runs.csv, _summary.json,
_summary.md and _tsne.png.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from lsr.bench.report.tables import format_table
from lsr.experiments.data import Dataset
from lsr.experiments.training import RunResult

# The summary table's metric columns: header, metric, scale, decimals.
SUMMARY_COLUMNS = (
    ("test accuracy (%)", "accuracy", 100, 2),
    ("ECE (%)", "ece", 100, 2),
    ("NLL", "nll", 1, 3),
    ("ms / step", "ms_per_step", 1, 2),
    ("warm-up ms / step", "warmup_ms", 1, 1),
    ("SparseLSR rel. loss error", "sparse_rel_loss_error", 1, 4),
    ("grad cosine", "sparse_grad_cosine", 1, 3),
)


def output_path(out: Path, dataset: str, kind: str) -> Path:
    """Where the `kind` file (e.g. "runs.csv") of a `dataset` experiment goes in `out`."""
    return out / f"train_{dataset}_{kind}"


def plus_minus(row: Mapping, metric: str, scale: float = 1.0, digits: int = 3) -> str:
    """A summary row's "mean ± std" of `metric`, scaled; just the mean when there is one seed."""
    mean, std = scale * row[f"{metric}_mean"], scale * row[f"{metric}_std"]
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# t-SNE


def tsne_embedding(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (N, D) features (perplexity capped for small N, which t-SNE requires)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    # Barnes-Hut can crawl on near-degenerate features (barely trained models); exact is quick for a few hundred points.
    method = "exact" if len(features) <= 250 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=seed)
    return tsne.fit_transform(features.double().numpy())


def plot_tsne(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    titles: dict[str, str],
    path: Path,
) -> Path:
    """One t-SNE scatter per loss, points coloured by true class."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    count = len(embeddings)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(5.2 * columns + 1.6, 5 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    colours = colormaps["tab10"](np.arange(len(class_names)) % 10)
    for ax, (name, points) in zip(axes, embeddings.items(), strict=False):
        for k, class_name in enumerate(class_names):
            mask = labels == k
            ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours[k], label=class_name)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="class", markerscale=3)
    fig.suptitle("t-SNE of the penultimate layer on the test set, one model per loss (first seed)")
    fig.savefig(path, dpi=110)
    return path


def tsne_titles(runs: Sequence[RunResult], summary: Sequence[Mapping]) -> dict[str, str]:
    """Each loss's panel title: its label, the drawn (first-seed) model's accuracy, all seeds' accuracy."""
    first = {r.loss: r for r in reversed(runs)}  # each loss's first-seed run
    return {
        row["loss"]: f"{row['label']}\nthis model (seed {first[row['loss']].seed}): "
        f"{100 * first[row['loss']].accuracy:.2f}%; all seeds: {plus_minus(row, 'accuracy', 100, 2)}%"
        for row in summary
    }


def draw_tsne(
    data: Dataset,
    features: Mapping[str, torch.Tensor],
    titles: dict[str, str],
    samples: int,
    path: Path,
) -> Path:
    """t-SNE panels of each loss's test `features`, on the first `samples` of a fixed shuffle of the test set."""
    # The same points for every loss, so that the panels compare.
    subset = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(0))[:samples]
    embeddings = {name: tsne_embedding(feats[subset]) for name, feats in features.items()}
    return plot_tsne(embeddings, data.y_test[subset].numpy(), data.class_names, titles, path)


# ---------------------------------------------------------------------------------------------
# Tables


def write_runs_csv(runs: Sequence[RunResult], path: Path) -> Path:
    """One row per run, the `RunResult` fields as columns."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in runs)
    return path


def summary_table(summary: Sequence[Mapping]) -> str:
    """The per-loss Markdown table: mean ± std of every metric."""
    headers = ["loss", "seeds", *(header for header, *_ in SUMMARY_COLUMNS)]
    rows = [
        [row["label"], row["seeds"], *(plus_minus(row, *column[1:]) for column in SUMMARY_COLUMNS)]
        for row in summary
    ]
    return format_table(headers, rows, markdown=True, align="l" + "r" * (len(headers) - 1))


def summary_markdown(summary: Sequence[Mapping], meta: Mapping) -> str:
    """The summary table and the settings, with the command that produced them."""
    lines = [
        f"# Training comparison: {meta['dataset']}",
        "",
        "Command:",
        "",
        f"    {meta['command']}",
        "",
        f"{meta['model']}, {meta['epochs']} epochs, batch {meta['batch_size']}, SGD (Nesterov, momentum "
        f"{meta['momentum']}, weight decay {meta['weight_decay']}) with lr {meta['lr']} and cosine decay; "
        f"smoothing {meta['smoothing']} for every smoothed loss; seeds {meta['seeds']}; "
        f"{meta['train_size']} training and {meta['test_size']} test samples; device {meta['device']}, "
        f"{meta['threads']} threads, torch {meta['torch_version']}. Total time {meta['total_seconds']:.0f} s.",
        "",
        "Mean ± sample standard deviation over the seeds. ECE: 15 equal-width bins, top label. "
        "NLL: plain cross-entropy of the test logits. Time per step: median wall time of forward, backward "
        "and optimiser step after the first 5 steps; warm-up: those 5 steps' mean (compilation, first "
        "touches of memory). The last two columns apply SparseLSR and exact LSR to the trained model's own "
        "test logits (at the run's smoothing): SparseLSR's relative loss error and the cosine between their "
        "gradients.",
        "",
        summary_table(summary),
        "",
        f"t-SNE of the penultimate layer: `{meta['tsne_file']}`.",
        "",
    ]
    return "\n".join(lines)


def write_results(
    out: Path, runs: Sequence[RunResult], summary: Sequence[Mapping], meta: Mapping, tsne: Path
) -> dict[str, Path]:
    """The runs CSV, the summary JSON and the summary Markdown in `out`; returns them and the t-SNE figure."""
    dataset = meta["dataset"]
    paths = {
        "runs": write_runs_csv(runs, output_path(out, dataset, "runs.csv")),
        "summary_json": output_path(out, dataset, "summary.json"),
        "summary_md": output_path(out, dataset, "summary.md"),
        "tsne": tsne,
    }
    record = {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}
    paths["summary_json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["summary_md"].write_text(summary_markdown(summary, meta))
    return paths
