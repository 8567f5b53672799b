"""`python -m lsr.experiments`: every figure, the approximation sweep, the digits run, and the README.

Everything is written into a staging folder beside --out and moved into --out only when all of it
is done, so an interrupted or failed run leaves the committed results as they were.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lsr.experiments import DEFAULT_OUT, approximation, loss_shapes, report, train

TRAINING_FILES = "train_*"  # what --skip-train keeps from --out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lsr.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path(DEFAULT_OUT), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--skip-train",
        action="store_true",
        help="keep the training results already in --out (default: retrain)",
    )
    return parser


def make_all(staging: Path, out: Path, skip_train: bool) -> list[Path]:
    """Every output, written into `staging`; the training run records `out`, where its files will be."""
    written = [*loss_shapes.make_figures(staging), *approximation.make_outputs(staging)]
    if not skip_train:
        paths = train.run_command(["--out", str(staging)], command=f"lsr-train --out {out}")
        written += paths.values()
    return [*written, report.write_readme(staging)]


def publish(staging: Path, out: Path) -> list[Path]:
    """Move every file of `staging` into `out`, each replaced whole (os.replace on one filesystem)."""
    out.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in sorted(p for p in staging.iterdir() if p.is_file()):
        os.replace(path, out / path.name)
        moved.append(out / path.name)
    return moved


# What the experiments import beyond torch, by module, and the package that provides it: all in the
# `experiments` extra, which the README's plain `.venv` does not install
NEEDED = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "psutil": "psutil", "tqdm": "tqdm"}


def missing_packages() -> list[str]:
    return [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    missing = missing_packages()
    if missing:  # before 10 s of figures, not after them: one line, exit 2
        sys.exit(
            f"python -m lsr.experiments: needs {', '.join(missing)}, which the experiments extra installs: "
            "pip install -c constraints.txt -e '.[experiments]' (or python3 -m nox -s experiments)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-staging-", dir=args.out.parent))
    try:
        if args.skip_train:
            for path in args.out.glob(TRAINING_FILES):
                shutil.copy2(path, staging / path.name)
        make_all(staging, args.out, args.skip_train)
        for path in publish(staging, args.out):
            print(path)
    except KeyboardInterrupt:
        print(f"interrupted; {args.out} is left as it was", file=sys.stderr)
        sys.exit(130)  # the shell's status for a run ended by SIGINT
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main()
