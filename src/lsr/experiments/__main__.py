"""`python -m lsr.experiments`: every figure, the approximation sweep, the digits run, and the README."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsr.experiments import DEFAULT_OUT, approximation, loss_shapes, report, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output folder")
    parser.add_argument(
        "--skip-train", action="store_true", help="keep the training results already in --out"
    )
    args = parser.parse_args(argv)
    for path in loss_shapes.make_figures(args.out):
        print(path)
    for path in approximation.make_outputs(args.out):
        print(path)
    if not args.skip_train:
        train.main(["--out", str(args.out)])
    print(report.write_readme(args.out))


if __name__ == "__main__":
    main()
