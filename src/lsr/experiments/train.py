"""`lsr-train`: train the same network with CE, exact LSR and SparseLSR, compare, and draw t-SNE.

The seed repository's `train.py` trained AlexNet on CIFAR-10 once per loss and drew a t-SNE of the
penultimate layer. This reproduces it with fixed seeds, several seeds per loss, and numbers:

- datasets: `digits` (scikit-learn's bundled 8x8 digits; the default; minutes on 2 CPU cores) and
  `cifar10` (the python-version pickle batches, `cifar-10-batches-py`, from --data-dir; nothing is
  downloaded and torchvision is not needed);
- models: a small CNN for digits, the paper's AlexNet-style network for CIFAR-10;
- losses: CE, exact LSR (`F.cross_entropy(label_smoothing=)`, registry "native"), SparseLSR
  (equation 15, registry "sparse"), and every other registered implementation that runs on the
  device (the fused kernels, when present);
- per run: test accuracy, expected calibration error (15 bins), NLL, median time per training step,
  and SparseLSR's loss error against exact LSR on the trained model's own test logits;
- one t-SNE panel per loss of the penultimate layer on the test set (first seed), coloured by class.

Every loss starts from the same initial weights and batch order for a given seed (paired runs).
Outputs: train_<dataset>_runs.csv, _summary.json, _summary.md (with the exact command), _tsne.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from lsr.experiments import DEFAULT_OUT
from lsr.experiments.data import Cifar10NotFoundError
from lsr.experiments.models import MODELS
from lsr.experiments.run import Experiment, run_experiment
from lsr.experiments.training import DEFAULT_SETTINGS, TrainSettings, available_loss_names


def build_parser() -> argparse.ArgumentParser:
    """`lsr-train`'s options; this module's docstring is its description."""
    parser = argparse.ArgumentParser(
        prog="lsr-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(MODELS), default="digits")
    parser.add_argument(
        "--data-dir", type=Path, help="cifar10: folder holding cifar-10-batches-py (or its files)"
    )
    parser.add_argument(
        "--losses", nargs="+", help="losses to train (default: ce lsr sparse and every registered fused one)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="default: 0 1 2 3 4")
    parser.add_argument(
        "--smoothing", type=float, default=0.1, help="xi for every smoothed loss (default 0.1)"
    )
    parser.add_argument("--epochs", type=int, help="default: digits 20, cifar10 30")
    parser.add_argument("--batch-size", type=int, help="default: digits 64, cifar10 128")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: digits 0.05, cifar10 0.01)")
    parser.add_argument("--max-train", type=int, help="use only this many training samples")
    parser.add_argument("--max-test", type=int, help="use only this many test samples")
    parser.add_argument(
        "--tsne-samples", type=int, default=2000, help="test points in the t-SNE (default 2000)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def experiment_from_args(
    args: argparse.Namespace, command: str, parser: argparse.ArgumentParser
) -> Experiment:
    """The experiment the parsed options ask for; refuses (via `parser.error`) what cannot run."""
    device = torch.device(args.device)
    known = available_loss_names(device.type)
    losses = args.losses or known
    unknown = [name for name in losses if name not in known]
    if unknown:
        parser.error(
            f"unknown or unavailable loss(es) {', '.join(unknown)} on {device.type}; choose from {', '.join(known)}"
        )
    if not 0.0 <= args.smoothing <= 1.0:
        parser.error("--smoothing must be in [0, 1]")
    defaults = DEFAULT_SETTINGS[args.dataset]
    settings = TrainSettings(
        epochs=args.epochs or defaults.epochs,
        batch_size=args.batch_size or defaults.batch_size,
        lr=args.lr or defaults.lr,
        momentum=defaults.momentum,
        weight_decay=defaults.weight_decay,
    )
    return Experiment(
        dataset=args.dataset,
        losses=list(dict.fromkeys(losses)),
        seeds=list(dict.fromkeys(args.seeds)),
        smoothing=args.smoothing,
        settings=settings,
        device=device,
        out=args.out,
        data_dir=args.data_dir,
        max_train=args.max_train,
        max_test=args.max_test,
        tsne_samples=args.tsne_samples,
        progress=not args.no_progress,
        command=command,
    )


def run_command(argv: list[str] | None = None, command: str | None = None) -> dict[str, Path]:
    """Run `lsr-train` with `argv` (default: the command line); prints and returns the files written.

    command: the command line to record in the outputs (default: `lsr-train` and `argv`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command or "lsr-train " + shlex.join(sys.argv[1:] if argv is None else argv)
    exp = experiment_from_args(args, command.strip(), parser)
    try:
        paths = run_experiment(exp)
    except Cifar10NotFoundError as exc:
        parser.exit(2, f"lsr-train: error: {exc}\n")
    for path in paths.values():
        print(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """The `lsr-train` entry point: `run_command`, returning nothing so that the exit status is 0.

    Ctrl-C ends it with one line and status 130; files are written only after training, so an
    interrupted run leaves the previous ones as they were.
    """
    try:
        run_command(argv)
    except KeyboardInterrupt:
        print("lsr-train: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
