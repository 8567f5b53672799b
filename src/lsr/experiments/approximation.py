"""How far SparseLSR is from exact label smoothing, in loss and in gradient.

SparseLSR replaces exact LSR's non-target term -(xi/C) sum_{j != y} log p_j by its value when the
non-target mass 1 - p_y is spread equally. Write p_j = (1 - p_y) r_j for j != y, where r is the
non-target distribution (it sums to 1 over the C - 1 non-targets). Then, up to the paper's 1e-7,

    exact - sparse = xi (C-1)/C * [log(1/(C-1)) - mean_j log r_j]  >= 0     (Jensen)

So the loss gap does not depend on p_y at all, grows linearly with xi, and is set by how unevenly r
spreads the non-target mass: zero when r is uniform (and always for C = 2), about xi sigma^2 / 2 when
the non-target logits are Gaussian with standard deviation sigma and C is large. The gradients
differ too: SparseLSR moves each non-target logit in proportion to p_j, exact LSR by p_j - xi/C.

Every number here comes from the library's functions (`native_label_smoothing` for exact LSR,
`sparse_label_smoothing` for equation 15) in float64, on logits built to realise a chosen p_y and
non-target distribution r:

- "equal": r uniform, Jensen's best case (only the paper's 1e-7 separates the two losses);
- "gaussian σ=1" and "gaussian σ=3": r = softmax of i.i.d. N(0, σ²) logits, a mildly and a strongly
  uneven non-target distribution, like the tails of trained classifiers;
- "zipf": r_j proportional to 1/rank, the heavy tail of language-model vocabularies.

`python -m lsr.experiments.approximation` writes approximation_error.csv and three charts.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lsr.experiments import DEFAULT_OUT
from lsr.native import native_label_smoothing
from lsr.sparse import sparse_label_smoothing

DISTRIBUTIONS = ("equal", "gaussian σ=1", "gaussian σ=3", "zipf")
GAUSSIAN_SIGMA = {"gaussian σ=1": 1.0, "gaussian σ=3": 3.0}

# The sweeps: one variable moves, the others stay at these values.
BASE_CLASSES, BASE_SMOOTHING, BASE_CONFIDENCE = 1000, 0.1, 0.7
CLASS_COUNTS = (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000)
SMOOTHING_VALUES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28, 0.3, 0.32, 0.35, 0.4, 0.5)
CONFIDENCES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.95, 0.99, 0.999)
ROWS_PER_POINT = 16  # random draws of r per point; the CSV holds their mean

METRICS = {
    "abs_loss_error": "|exact − sparse| loss",
    "rel_loss_error": "relative loss error |exact − sparse| / exact",
    "grad_rel_l2_error": "gradient relative L2 error ‖g_sparse − g_exact‖ / ‖g_exact‖",
    "grad_cosine": "gradient cosine similarity",
}


def non_target_distribution(
    kind: str, num_non_targets: int, rows: int, generator: torch.Generator
) -> torch.Tensor:
    """(rows, num_non_targets) float64 distributions r over the non-target classes, each summing to 1."""
    if kind == "equal":
        return torch.full((rows, num_non_targets), 1.0 / num_non_targets, dtype=torch.float64)
    if kind in GAUSSIAN_SIGMA:
        logits = GAUSSIAN_SIGMA[kind] * torch.randn(
            rows, num_non_targets, generator=generator, dtype=torch.float64
        )
        return torch.softmax(logits, dim=1)
    if kind == "zipf":
        weights = 1.0 / torch.arange(1, num_non_targets + 1, dtype=torch.float64)
        return (weights / weights.sum()).expand(rows, num_non_targets).clone()
    raise ValueError(f"unknown non-target distribution {kind!r}; choose from {DISTRIBUTIONS}")


def logits_for(p_y: float, spread: torch.Tensor) -> torch.Tensor:
    """(rows, C) logits whose softmax is p_y on class 0 and (1 - p_y) * spread on classes 1..C-1."""
    target_column = torch.full((spread.shape[0], 1), math.log(p_y), dtype=torch.float64)
    return torch.cat([target_column, math.log1p(-p_y) + torch.log(spread)], dim=1)


def _loss_and_grad(loss_fn, logits: torch.Tensor, target: torch.Tensor, smoothing: float):
    z = logits.detach().clone().requires_grad_(True)
    per_row = loss_fn(z, target, smoothing, reduction="none")
    # Rows are independent, so the gradient of the sum is every row's own gradient.
    (grad,) = torch.autograd.grad(per_row.sum(), z)
    return per_row.detach(), grad


def approximation_error(
    logits: torch.Tensor, target: torch.Tensor, smoothing: float
) -> dict[str, torch.Tensor]:
    """Per-row error of SparseLSR (equation 15) against exact label smoothing, both from lsr.

    Returns (rows,) float64 tensors: the signed loss gap exact - sparse and its absolute and relative
    size, the gradients' relative L2 error and their cosine similarity (NaN where a gradient is 0).
    """
    logits = logits.to(torch.float64)
    exact, g_exact = _loss_and_grad(native_label_smoothing, logits, target, smoothing)
    sparse, g_sparse = _loss_and_grad(sparse_label_smoothing, logits, target, smoothing)
    gap = exact - sparse
    exact_norm, sparse_norm = g_exact.norm(dim=1), g_sparse.norm(dim=1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "loss_gap": gap,
        "abs_loss_error": gap.abs(),
        "rel_loss_error": gap.abs() / exact.abs(),
        "grad_rel_l2_error": torch.where(exact_norm > 0, (g_sparse - g_exact).norm(dim=1) / exact_norm, nan),
        "grad_cosine": torch.where(
            (exact_norm > 0) & (sparse_norm > 0),
            (g_sparse * g_exact).sum(dim=1) / (exact_norm * sparse_norm),
            nan,
        ),
    }


@dataclass(frozen=True)
class ErrorPoint:
    """Mean error over `rows` random rows at one (distribution, C, smoothing, p_y) point."""

    sweep: str
    distribution: str
    num_classes: int
    smoothing: float
    confidence: float
    rows: int
    loss_gap: float
    abs_loss_error: float
    rel_loss_error: float
    grad_rel_l2_error: float
    grad_cosine: float


def error_point(
    sweep: str, kind: str, num_classes: int, smoothing: float, confidence: float, rows: int, seed: int = 0
) -> ErrorPoint:
    generator = torch.Generator().manual_seed(seed)
    spread = non_target_distribution(kind, num_classes - 1, rows, generator)
    target = torch.zeros(rows, dtype=torch.long)
    errors = approximation_error(logits_for(confidence, spread), target, smoothing)
    means = {name: float(values.nanmean()) for name, values in errors.items()}
    return ErrorPoint(sweep, kind, num_classes, smoothing, confidence, rows, **means)


def sweep_points(
    class_counts: Sequence[int] = CLASS_COUNTS,
    smoothing_values: Sequence[float] = SMOOTHING_VALUES,
    confidences: Sequence[float] = CONFIDENCES,
    distributions: Sequence[str] = DISTRIBUTIONS,
    rows: int = ROWS_PER_POINT,
) -> list[ErrorPoint]:
    """The three sweeps (class count, smoothing, confidence), each around the base point."""
    points = []
    for kind in distributions:
        # Deterministic distributions need one row only.
        n = rows if kind in GAUSSIAN_SIGMA else 1
        points += [error_point("classes", kind, c, BASE_SMOOTHING, BASE_CONFIDENCE, n) for c in class_counts]
        points += [
            error_point("smoothing", kind, BASE_CLASSES, xi, BASE_CONFIDENCE, n) for xi in smoothing_values
        ]
        points += [error_point("confidence", kind, BASE_CLASSES, BASE_SMOOTHING, p, n) for p in confidences]
    return points


def write_csv(points: Sequence[ErrorPoint], path: Path) -> Path:
    fields = list(asdict(points[0]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    return path


def read_csv(path: Path) -> list[ErrorPoint]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    types = {name: field.type for name, field in ErrorPoint.__dataclass_fields__.items()}
    casts = {"str": str, "int": int, "float": float}
    return [ErrorPoint(**{k: casts[types[k]](v) for k, v in row.items()}) for row in rows]


SWEEP_AXES = {
    "classes": ("num_classes", "number of classes C (log scale)", "log"),
    "smoothing": ("smoothing", "smoothing ξ (log scale)", "log"),
    "confidence": ("confidence", "target probability $p_y$ (logit scale)", "logit"),
}
# Log axes cannot show 0: errors below this (none in the default sweeps) are drawn on it.
LOG_FLOOR = 1e-16


def exact_optimum_marker(sweep: str) -> float | None:
    """Where the sweep crosses exact LSR's minimiser p_y = 1 - xi + xi/C, if it does.

    There exact LSR's target gradient vanishes and what is left of its gradient flattens the
    non-target distribution, which SparseLSR does not do: its gradient is near zero there.
    """
    if sweep == "confidence":
        return 1 - BASE_SMOOTHING + BASE_SMOOTHING / BASE_CLASSES
    if sweep == "smoothing":
        return (1 - BASE_CONFIDENCE) / (1 - 1 / BASE_CLASSES)
    return None


def plot_sweep(points: Sequence[ErrorPoint], sweep: str, path: Path) -> Path:
    """2 x 2 panels, one per metric, one line per non-target distribution."""
    from matplotlib.figure import Figure

    x_field, x_label, x_scale = SWEEP_AXES[sweep]
    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (metric, label) in zip(axes, METRICS.items(), strict=True):
        for kind in dict.fromkeys(p.distribution for p in points):
            series = sorted(
                (getattr(p, x_field), getattr(p, metric))
                for p in points
                if p.sweep == sweep and p.distribution == kind
            )
            xs = [x for x, _ in series]
            ys = [y if metric == "grad_cosine" else max(y, LOG_FLOOR) for _, y in series]  # log axes: no 0
            ax.plot(xs, ys, marker="o", ms=4, lw=1.8, label=kind)
        ax.set_xscale(x_scale)
        if metric != "grad_cosine":
            ax.set_yscale("log")
        ax.set_title(label, fontsize=11)
        ax.grid(alpha=0.3, which="both" if metric != "grad_cosine" else "major")
    optimum = exact_optimum_marker(sweep)
    for ax in axes:
        if optimum is not None:
            ax.axvline(optimum, color="grey", ls=":", lw=1.2, label="exact LSR optimum $p_y = 1 - ξ + ξ/C$")
    for ax in axes[2:]:
        ax.set_xlabel(x_label)
    axes[0].legend(title="non-target distribution r", fontsize=9)
    fixed = {
        "classes": f"ξ = {BASE_SMOOTHING}, $p_y$ = {BASE_CONFIDENCE}",
        "smoothing": f"C = {BASE_CLASSES}, $p_y$ = {BASE_CONFIDENCE}",
        "confidence": f"C = {BASE_CLASSES}, ξ = {BASE_SMOOTHING}",
    }[sweep]
    fig.suptitle(
        f"SparseLSR (eq. 15) against exact label smoothing, by {x_label.split(' (')[0]} ({fixed})\n"
        f"float64, mean over the rows; 'equal' is Jensen's tight case, its ~1e-8 is the paper's 1e-7 guard"
    )
    fig.savefig(path, dpi=110)
    return path


def make_outputs(out: Path, rows: int = ROWS_PER_POINT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    points = sweep_points(rows=rows)
    paths = [write_csv(points, out / "approximation_error.csv")]
    paths += [plot_sweep(points, sweep, out / f"approximation_error_vs_{sweep}.png") for sweep in SWEEP_AXES]
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    parser.add_argument(
        "--rows", type=int, default=ROWS_PER_POINT, help="random rows per point (default: 16)"
    )
    args = parser.parse_args(argv)
    for path in make_outputs(args.out, args.rows):
        print(path)


if __name__ == "__main__":
    main()
