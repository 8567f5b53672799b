"""Loss shapes: each loss's target and non-target term against the predicted probability.

The seed repository's `visualizations.py` typed each formula again in numpy. Here every curve comes
from the library's own functions, evaluated in float64 on logits built so that softmax gives the
probability on the x axis:

- an output's share of exact label smoothing (or CE) is the loss with a one-hot class weight on that
  output and reduction "none" (PyTorch's weighted smoothing term is -(xi/C) sum_j w_j log p_j);
- SparseLSR has no weights and no non-target term: its row loss depends on p_y alone. Its
  non-target curve is measured as the change in row loss when one non-target output takes the
  probability on the x axis while p_y stays put, which is zero everywhere.

`python -m lsr.experiments.loss_shapes` writes loss_shapes.png and seed_snippet_loss.png.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lsr.experiments import DEFAULT_OUT
from lsr.native import native_label_smoothing
from lsr.sparse import PAPER_EPS, seed_snippet_sparse_lsr, sparse_label_smoothing

# The seed figure's smoothing values and class count.
SMOOTHING_VALUES = (0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2)
DEFAULT_CLASSES = 100

TARGET, NON_TARGET = 0, 1  # class indices used in every constructed row

LossCurve = Callable[[torch.Tensor, float, int], torch.Tensor]  # (probabilities, smoothing, C) -> loss


def logits_with_probability(p: torch.Tensor, num_classes: int, cls: int = TARGET) -> torch.Tensor:
    """(K, C) float64 logits whose softmax gives class `cls` probability p[k] in row k and spreads
    1 - p[k] equally over the other C - 1 classes (log-probabilities are valid logits)."""
    p = p.to(torch.float64)
    rest = torch.log((1 - p) / (num_classes - 1))
    logits = rest.unsqueeze(1).repeat(1, num_classes)
    logits[:, cls] = torch.log(p)
    return logits


def _one_hot_weight(cls: int, num_classes: int) -> torch.Tensor:
    weight = torch.zeros(num_classes, dtype=torch.float64)
    weight[cls] = 1.0
    return weight


def _output_share(logits: torch.Tensor, target: int, output: int, smoothing: float) -> torch.Tensor:
    """The part of exact label smoothing (CE at smoothing 0) that output `output` contributes."""
    targets = torch.full((logits.shape[0],), target, dtype=torch.long)
    weight = _one_hot_weight(output, logits.shape[1])
    return native_label_smoothing(logits, targets, smoothing, reduction="none", weight=weight)


def exact_target_loss(p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Exact LSR's target term, -(1 - xi + xi/C) log p_y, as `F.cross_entropy` computes it."""
    return _output_share(logits_with_probability(p_y, num_classes), TARGET, TARGET, smoothing)


def exact_non_target_loss(p_j: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Exact LSR's term for one non-target output at probability p_j, -(xi/C) log p_j."""
    logits = logits_with_probability(p_j, num_classes, cls=NON_TARGET)
    return _output_share(logits, TARGET, NON_TARGET, smoothing)


def ce_target_loss(p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Cross-entropy's target term, -log p_y (smoothing ignored: CE has none)."""
    return exact_target_loss(p_y, 0.0, num_classes)


def ce_non_target_loss(p_j: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Cross-entropy's term for a non-target output: zero."""
    return exact_non_target_loss(p_j, 0.0, num_classes)


def _row_loss(loss_fn, p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    logits = logits_with_probability(p_y, num_classes)
    targets = torch.full((logits.shape[0],), TARGET, dtype=torch.long)
    return loss_fn(logits, targets, smoothing, reduction="none")


def sparse_target_loss(p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """SparseLSR (equation 15): the whole row loss sits on the target output."""
    return _row_loss(sparse_label_smoothing, p_y, smoothing, num_classes)


def seed_snippet_target_loss(p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """The seed snippet's row loss (its second term added instead of subtracted)."""
    return _row_loss(seed_snippet_sparse_lsr, p_y, smoothing, num_classes)


def exact_row_loss(p_y: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Exact LSR's whole row loss with the non-target mass spread equally."""
    return _row_loss(native_label_smoothing, p_y, smoothing, num_classes)


def sparse_non_target_loss(p_j: torch.Tensor, smoothing: float, num_classes: int) -> torch.Tensor:
    """Change in SparseLSR's row loss when one non-target output moves to p_j with p_y held fixed.

    The target keeps the probability it has in the equal-spread row with p_j on the non-target
    output, and the comparison row spreads the same non-target mass equally instead.
    """
    with_p_j = logits_with_probability(p_j, num_classes, cls=NON_TARGET)
    p_y = torch.softmax(with_p_j, dim=1)[:, TARGET]
    equal_spread = logits_with_probability(p_y, num_classes, cls=TARGET)
    targets = torch.full((p_j.shape[0],), TARGET, dtype=torch.long)
    return sparse_label_smoothing(with_p_j, targets, smoothing, reduction="none") - sparse_label_smoothing(
        equal_spread, targets, smoothing, reduction="none"
    )


# (row title, target curve, non-target curve, whole-row curve with equal spread)
LOSSES: tuple[tuple[str, LossCurve, LossCurve, LossCurve], ...] = (
    ("Cross-entropy", ce_target_loss, ce_non_target_loss, lambda p, xi, c: exact_row_loss(p, 0.0, c)),
    ("Exact LSR (F.cross_entropy)", exact_target_loss, exact_non_target_loss, exact_row_loss),
    ("SparseLSR (equation 15)", sparse_target_loss, sparse_non_target_loss, sparse_target_loss),
)


def smoothing_colours(count: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0.0, 0.9, count))


def plot_loss_shapes(
    path: Path, num_classes: int = DEFAULT_CLASSES, smoothing_values: Sequence[float] = SMOOTHING_VALUES
) -> Path:
    """One row per loss (CE, exact LSR, SparseLSR), columns: target term, non-target term, row loss."""
    from matplotlib.figure import Figure

    probs = torch.linspace(0.01, 0.99, 491, dtype=torch.float64)
    colours = smoothing_colours(len(smoothing_values))
    fig = Figure(figsize=(15, 11), layout="constrained")
    axes = fig.subplots(len(LOSSES), 3, sharex=True)
    columns = (
        ("target term (y = 1)", "predicted probability of the target, $p_y$"),
        ("non-target term (y = 0) of one output", "predicted probability of that output, $p_j$"),
        ("whole row loss, non-target mass spread equally", "predicted probability of the target, $p_y$"),
    )
    for row, (name, *curves) in enumerate(LOSSES):
        for col, curve in enumerate(curves):
            ax = axes[row, col]
            for colour, xi in zip(colours, smoothing_values, strict=True):
                ax.plot(
                    probs.numpy(),
                    curve(probs, xi, num_classes).numpy(),
                    color=colour,
                    lw=2,
                    label=f"ξ = {xi}",
                )
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel(f"{name}\nloss", fontsize=11)
    for col, (title, xlabel) in enumerate(columns):
        axes[0, col].set_title(title, fontsize=11)
        axes[-1, col].set_xlabel(xlabel)
    # One y range for the non-target column, so that CE's and SparseLSR's zero read as flat lines
    # (SparseLSR's difference is float64 rounding, about 1e-15).
    top = max(line.get_ydata().max() for ax in axes[:, 1] for line in ax.get_lines())
    for ax in axes[:, 1]:
        ax.set_ylim(-0.05 * top, 1.05 * top)
    for xi, colour in zip(smoothing_values, colours, strict=True):
        # Exact LSR and SparseLSR are both minimised at p_y = 1 - xi + xi/C.
        for row in (1, 2):
            axes[row, 2].axvline(1 - xi + xi / num_classes, color=colour, ls=":", lw=1)
    axes[1, 0].legend(title="smoothing", fontsize=8)
    axes[2, 1].annotate(
        "SparseLSR has no non-target term:\nits row loss depends on $p_y$ alone",
        xy=(0.5, 0.6),
        xycoords="axes fraction",
        ha="center",
        fontsize=10,
    )
    fig.suptitle(
        f"Loss shapes, C = {num_classes} classes, computed with lsr's loss functions "
        "(dotted: minimiser $p_y = 1 - \\xi + \\xi/C$)"
    )
    fig.savefig(path, dpi=110)
    return path


def plot_seed_snippet(
    path: Path, num_classes: int = DEFAULT_CLASSES, smoothing_values: Sequence[float] = SMOOTHING_VALUES
) -> Path:
    """The seed snippet's row loss next to equation 15: it falls all the way to p_y = 1, below zero."""
    from matplotlib.figure import Figure

    colours = smoothing_colours(len(smoothing_values))
    fig = Figure(figsize=(14, 5), layout="constrained")
    ax_p, ax_gap = fig.subplots(1, 2)
    probs = torch.linspace(0.01, 0.99, 491, dtype=torch.float64)
    # 1 - p_y from 1e-7 (the paper's clamp) to 0.99, on a log axis, to show the behaviour near p_y = 1.
    one_minus_p = torch.logspace(-7, np.log10(0.99), 400, dtype=torch.float64)
    for colour, xi in zip(colours, smoothing_values, strict=True):
        ax_p.plot(
            probs, seed_snippet_target_loss(probs, xi, num_classes), color=colour, lw=2, label=f"ξ = {xi}"
        )
        ax_p.plot(probs, sparse_target_loss(probs, xi, num_classes), color=colour, lw=1, ls="--")
        p_y = 1 - one_minus_p
        ax_gap.plot(one_minus_p, seed_snippet_target_loss(p_y, xi, num_classes), color=colour, lw=2)
        ax_gap.plot(one_minus_p, sparse_target_loss(p_y, xi, num_classes), color=colour, lw=1, ls="--")
    ax_p.set_xlabel("predicted probability of the target, $p_y$")
    ax_p.set_title("row loss against $p_y$ (solid: seed snippet, dashed: equation 15)", fontsize=10)
    ax_gap.set_xscale("log")
    ax_gap.set_xlabel("$1 - p_y$ (log scale; the snippet clamps it at $10^{-7}$)")
    ax_gap.set_title("near $p_y = 1$: the snippet keeps falling, below zero", fontsize=10)
    for ax in (ax_p, ax_gap):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    ax_p.legend(title="smoothing", fontsize=8)
    fig.suptitle(
        f"The seed snippet's sign variant (C = {num_classes}) is minimised at $p_y = 1$ with a negative loss: "
        f"it sharpens instead of smoothing (clamp {PAPER_EPS:g})"
    )
    fig.savefig(path, dpi=110)
    return path


def make_figures(out: Path, num_classes: int = DEFAULT_CLASSES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_loss_shapes(out / "loss_shapes.png", num_classes),
        plot_seed_snippet(out / "seed_snippet_loss.png", num_classes),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=DEFAULT_CLASSES, help="class count C (default: 100)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    args = parser.parse_args(argv)
    if args.classes < 2:
        parser.error("--classes must be at least 2")
    for path in make_figures(args.out, args.classes):
        print(path)


if __name__ == "__main__":
    main()
