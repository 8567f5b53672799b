"""`lsr-bench` (also `python -m lsr.bench`): run a sweep, draw its charts, compare two runs, merge
the runs of several machines.

Arguments that cannot be run are refused before anything is measured, with one line on stderr and
exit status 2 (`arguments`). Ctrl-C ends a run with one line and status 130; the rows measured so
far stay on disk for `--resume`. Launched by torchrun with several ranks, `run` shares its cases
among them (`lsr.bench.sweep.shard`) and rank 0 alone prints the tables and draws the charts. The
commands are in `commands`, the argparse tree in `parser`.
"""

from lsr.bench.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
