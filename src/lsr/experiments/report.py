"""Write results/experiments/README.md from the files the experiments left there.

The numbers in the reading are taken from approximation_error.csv and train_*_summary.json, so the
text follows the data when the experiments are re-run; the statements that compare two numbers are
worded from the comparison.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from lsr.bench.report.tables import format_table
from lsr.experiments import DEFAULT_OUT
from lsr.experiments.approximation import (
    BASE_CLASSES,
    BASE_CONFIDENCE,
    BASE_SMOOTHING,
    GAUSSIAN_SIGMA,
    ErrorPoint,
    read_csv,
)

COMMANDS = """\
All of it (figures, approximation sweep, the default digits training run, this README), from the
repository root:

    python -m lsr.experiments

One piece at a time:

    python -m lsr.experiments.loss_shapes            # loss_shapes.png, seed_snippet_loss.png (--classes C)
    python -m lsr.experiments.approximation          # approximation_error.csv and _vs_*.png
    lsr-train                                        # = python -m lsr.experiments.train; digits, 5 seeds
    lsr-train --dataset cifar10 --data-dir DIR --smoothing 0.25   # the paper's setting, needs the batches
    python -m lsr.experiments.report                 # this README from the files above
"""


def _fmt(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 0.01 else f"{x:.3f}"


def _points(points: Sequence[ErrorPoint], sweep: str, distribution: str) -> list[ErrorPoint]:
    return [p for p in points if p.sweep == sweep and p.distribution == distribution]


def _base_point_table(base: dict[str, ErrorPoint]) -> str:
    """Loss and gradient error per non-target distribution at the base point, as a Markdown table."""
    headers = [
        "non-target distribution",
        "exact − sparse",
        "relative",
        "gradient rel. L2 error",
        "gradient cosine",
    ]
    rows = [
        [
            kind,
            _fmt(p.abs_loss_error),
            f"{100 * p.rel_loss_error:.2g}%",
            _fmt(p.grad_rel_l2_error),
            f"{p.grad_cosine:.4f}",
        ]
        for kind, p in base.items()
    ]
    return format_table(headers, rows, markdown=True, align="lrrrr")


def approximation_reading(points: Sequence[ErrorPoint]) -> str:
    """The written reading of the approximation-error charts, with numbers from the sweep."""
    base = {
        p.distribution: p
        for p in points
        if p.sweep == "classes" and p.num_classes == BASE_CLASSES and p.smoothing == BASE_SMOOTHING
    }
    equal_max = max(p.rel_loss_error for p in points if p.distribution == "equal")
    lines = [
        f"At C = {BASE_CLASSES}, ξ = {BASE_SMOOTHING}, $p_y$ = {BASE_CONFIDENCE}, SparseLSR's loss is below "
        "exact LSR's by:",
        "",
        _base_point_table(base),
    ]
    gaussian_big = [p for p in _points(points, "classes", "gaussian σ=3") if p.num_classes >= 1000]
    confidence = {kind: _points(points, "confidence", kind) for kind in base}
    flat = max(
        (max(p.abs_loss_error for p in ps) - min(p.abs_loss_error for p in ps))
        / max(p.abs_loss_error for p in ps)
        for kind, ps in confidence.items()
        if kind != "equal"
    )
    worst_cos = min(p.grad_cosine for p in points if not math.isnan(p.grad_cosine))
    far = [p for p in confidence["gaussian σ=1"] if p.confidence <= 0.5]
    lines += [
        "",
        "Reading the charts:",
        "",
        "- **The loss gap is Jensen's gap of the non-target distribution, nothing else.** With the non-target "
        f"probabilities all equal (Jensen's tight case) the two losses differ only by the paper's 1e-7 guard "
        f"(relative error at most {equal_max:.1g} over every sweep). For C = 2 there is one non-target class, "
        "so every distribution is this case. For uneven non-target distributions the gap is "
        "ξ(C−1)/C · [log(1/(C−1)) − mean log r]: it grows linearly with ξ, saturates in C (about "
        f"ξσ²/2 for Gaussian logits: {_fmt(statistics_mean(p.abs_loss_error for p in gaussian_big))} for "
        f"σ = {GAUSSIAN_SIGMA['gaussian σ=3']:g}, ξ = {BASE_SMOOTHING}, C ≥ 1000), grows like log log C for "
        f"a Zipf tail, and does not depend on $p_y$ at all (it varies by at most {100 * flat:.2g}% across the "
        "confidence sweep). In relative terms SparseLSR under-reports the loss by a few percent for mildly "
        "uneven non-target distributions and by tens of percent for peaked ones.",
        "- **The gradients agree while the target term dominates and disagree near the smoothing optimum.** "
        "Both gradients share the target component; for the non-targets exact LSR uses p_j − ξ/C (which pulls "
        "small probabilities up, flattening the non-target distribution) and SparseLSR uses p_j·(A − B·p_y/(1−p_y)) "
        "(proportional to p_j, so it keeps the non-target shape). Far below the optimum (σ = 1, $p_y$ ≤ 0.5) "
        f"the relative gradient error is {_fmt(min(p.grad_rel_l2_error for p in far))}–"
        f"{_fmt(max(p.grad_rel_l2_error for p in far))}. At exact LSR's optimum $p_y$ = 1 − ξ + ξ/C (dotted lines) "
        "SparseLSR's gradient vanishes while exact LSR's still flattens the non-targets: the relative error "
        f"reaches about 1 and the cosine drops to {worst_cos:.2f}. That optimum is where a model trained with "
        "label smoothing spends the end of training, so SparseLSR is a good approximation of label smoothing's "
        "confidence penalty but not of its effect on the non-target distribution.",
        "- **Class count.** The relative gradient error is largest for tens to hundreds of classes and falls "
        "slowly for very large C, where each non-target logit's gradient is tiny either way; the relative "
        "loss error does not fall with C for heavy-tailed (Zipf) non-target distributions.",
    ]
    return "\n".join(lines)


def statistics_mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _row(summary: dict, loss: str) -> dict | None:
    return next((row for row in summary["summary"] if row["loss"] == loss), None)


def _compare(a: float, b: float, higher: str, lower: str, same: str, tolerance: float) -> str:
    if abs(a - b) <= tolerance:
        return same
    return higher if a > b else lower


def training_reading(summary: dict) -> str:
    """The written reading of one training comparison, with numbers from its summary JSON."""
    ce, exact, sparse = (_row(summary, name) for name in ("ce", "lsr", "sparse"))
    if not (ce and exact and sparse):
        return ""
    acc_spread = max(
        row["accuracy_std"] for row in summary["summary"] if not math.isnan(row.get("accuracy_std", math.nan))
    )

    def pct(row, metric):
        return f"{100 * row[f'{metric}_mean']:.2f}%"

    accuracy_words = _compare(
        max(exact["accuracy_mean"], sparse["accuracy_mean"]),
        ce["accuracy_mean"],
        "slightly above",
        "slightly below",
        "within the seed-to-seed spread of",
        tolerance=acc_spread,
    )
    lines = [
        f"- Test accuracy of the smoothed losses (LSR {pct(exact, 'accuracy')}, SparseLSR {pct(sparse, 'accuracy')}) "
        f"is {accuracy_words} CE's ({pct(ce, 'accuracy')}); the largest seed-to-seed standard deviation is "
        f"{100 * acc_spread:.2f} points.",
        f"- Calibration: CE's ECE is {pct(ce, 'ece')}, LSR's {pct(exact, 'ece')}, SparseLSR's {pct(sparse, 'ece')}. "
        + _compare(
            exact["ece_mean"],
            ce["ece_mean"],
            "On this easy task the CE model is already well calibrated and smoothing makes it under-confident "
            "(its test confidence sits near 1 − ξ + ξ/C while its accuracy is higher), so smoothing raises ECE "
            "and NLL here.",
            "Smoothing lowers ECE here.",
            "Smoothing leaves ECE about where it was.",
            tolerance=0.002,
        ),
        f"- SparseLSR against exact LSR on the trained models' own test logits: relative loss error "
        f"{100 * exact['sparse_rel_loss_error_mean']:.1f}% on the LSR-trained models and "
        f"{100 * sparse['sparse_rel_loss_error_mean']:.1f}% on the SparseLSR-trained ones; gradient cosine "
        f"{exact['sparse_grad_cosine_mean']:.2f} and {sparse['sparse_grad_cosine_mean']:.2f}. The models sit near "
        "the smoothing optimum, where (see above) the two gradients differ most: SparseLSR-trained models keep "
        "a more uneven non-target distribution, which is what exact label smoothing would still correct.",
        "- Time per step is dominated by the network at 10 classes, so the loss hardly changes it; a large "
        "standard deviation in that column marks runs slowed by other jobs sharing the CPU, not the loss.",
    ]
    return "\n".join(lines)


def training_section(summary_path: Path) -> str:
    summary = json.loads(summary_path.read_text())
    table = summary_path.with_suffix(".md").read_text().split("\n", 2)[2]  # drop the md's own title
    meta = summary["meta"]
    return "\n".join(
        [
            f"## Training comparison: {meta['dataset']}",
            "",
            table.strip(),
            "",
            f"![t-SNE]({meta['tsne_file']})",
            "",
            training_reading(summary),
            "",
        ]
    )


def write_readme(out: Path) -> Path:
    """README.md in `out`, from whatever results are there."""
    parts = [
        "# Experiments: loss shapes, SparseLSR's approximation error, training comparison",
        "",
        "Generated by `python -m lsr.experiments.report` from the files in this folder; every number below "
        "is read from them.",
        "",
        COMMANDS,
        "## Loss shapes",
        "",
        "Each curve is the library's own loss (`F.cross_entropy` via `lsr.native_label_smoothing`, "
        "`lsr.sparse_label_smoothing`, `lsr.seed_snippet_sparse_lsr`) evaluated in float64 on logits built to "
        "give the probability on the x axis; an output's share of exact LSR is the loss with a one-hot class "
        "weight on that output. SparseLSR moves the whole smoothing penalty onto the target output: its row "
        "loss equals exact LSR's when the non-target mass is spread equally, and both are minimised at "
        "$p_y$ = 1 − ξ + ξ/C.",
        "",
        "![loss shapes](loss_shapes.png)",
        "",
        "The seed snippet adds the redistributed term instead of subtracting it. Its loss keeps falling as "
        "$p_y$ → 1 and goes below zero: it rewards over-confidence, the opposite of smoothing.",
        "",
        "![seed snippet](seed_snippet_loss.png)",
        "",
        "## Approximation error of SparseLSR against exact label smoothing",
        "",
        "Exact LSR is `F.cross_entropy(label_smoothing=ξ)` and SparseLSR is equation 15, both from `lsr`, in "
        "float64, loss and autograd gradient per row. Rows are built with target probability $p_y$ and "
        "non-target probabilities (1 − $p_y$)·r, for four non-target distributions r: **equal** (Jensen's tight "
        "case: SparseLSR is then exact), **gaussian σ=1** and **gaussian σ=3** (softmax of i.i.d. normal "
        "logits: mildly and strongly uneven, like trained classifiers' non-target logits; 16 random rows per "
        "point, mean shown), and **zipf** (r ∝ 1/rank, a language-model-like tail). Each chart moves one of "
        f"C (2 to 100 000), ξ (0.01 to 0.5) and $p_y$ (0.01 to 0.999) around C = {BASE_CLASSES}, "
        f"ξ = {BASE_SMOOTHING}, $p_y$ = {BASE_CONFIDENCE}. Data: `approximation_error.csv`.",
        "",
        "![by class count](approximation_error_vs_classes.png)",
        "![by smoothing](approximation_error_vs_smoothing.png)",
        "![by confidence](approximation_error_vs_confidence.png)",
        "",
    ]
    csv_path = out / "approximation_error.csv"
    if csv_path.is_file():
        parts += [approximation_reading(read_csv(csv_path)), ""]
    for summary_path in sorted(out.glob("train_*_summary.json")):
        parts.append(training_section(summary_path))
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="results folder")
    print(write_readme(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
