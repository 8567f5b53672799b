"""What the command line asks for, checked before anything is measured: one-line refusals (exit
status 2), help that states every default, argument types that check each value, and `plans`, the
sweep per device that `lsr-bench run`'s options make of a preset's grids."""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import lsr
import lsr.heads
from lsr.bench import sweep as grids
from lsr.bench.data import Case

EXIT_USAGE = 2


class UsageError(Exception):
    """Arguments that cannot be run: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with refusals on one line, like the CLI's own, instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"lsr-bench: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to help that does not state its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text:
            return text
        return f"{text} (default: off)" if action.default is False else super()._get_help_string(action)


FORMAT = {"formatter_class": HelpFormatter}


def checked(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, refused with `rule` unless ok(value)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return convert


AT_LEAST_ONE = checked(int, lambda v: v >= 1, "must be at least 1")
PROBABILITY = checked(float, lambda v: 0 <= v <= 1, "must be in [0, 1]")  # NaN fails both
FRACTION = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
SWITCH = {"off": False, "on": True}


def THREADS(text: str) -> int | str:
    """An argparse type for a threads axis value: a count >= 1, or "all" (torch's own count)."""
    return grids.ALL_CORES if text == grids.ALL_CORES else AT_LEAST_ONE(text)


POSITIVE = checked(float, lambda v: math.isfinite(v) and v > 0, "must be finite and above 0")
NON_NEGATIVE = checked(float, lambda v: math.isfinite(v) and v >= 0, "must be finite and at least 0")


def check_writable(directory: Path, what: str) -> None:
    """Refuse now, not after a sweep, a directory that cannot be made or written into."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(f"{what} {directory}: cannot write there ({e.strerror or e})") from None


def _check_named(names: list[str], device: str, chosen: list[grids.Grid | grids.HeadGrid]) -> None:
    """Named implementations must run on the device, take every class count asked for, and take
    class weights or ignored targets where those are all that is asked for (the default list instead
    leaves them out where they cannot, as the grid does). A head preset's names must be head losses
    (`lsr.heads`), whose cases are all recorded, a reason in each row that cannot run."""
    if any(isinstance(grid, grids.HeadGrid) for grid in chosen):
        logits_losses = [name for name in names if name not in lsr.heads.HEAD_REGISTRY]
        if logits_losses:
            raise UsageError(
                f"{', '.join(logits_losses)}: not head losses; a head preset takes {', '.join(lsr.heads.HEAD_REGISTRY)}"
            )
        return
    head_losses = [name for name in names if name not in lsr.REGISTRY]
    if head_losses:
        raise UsageError(f"{', '.join(head_losses)}: head losses, measured by --preset head")
    cannot = [name for name in names if not lsr.get(name).runs_on(device)]
    if cannot:
        raise UsageError(f"{', '.join(cannot)} cannot run on {device} here (see lsr.REGISTRY)")
    fewest = min(c for grid in chosen for c in grid.classes)
    for name in names:
        impl = lsr.get(name)
        if fewest < impl.min_classes:
            raise UsageError(f"{name} needs at least {impl.min_classes} classes, got --classes {fewest}")
        reasons = [  # a reason for each (weights, ignored targets) asked for; one None: it has cases
            impl.unsupported(classes=max(grid.classes), weighted=weighted, ignoring=fraction > 0)
            for grid in chosen
            for weighted in grid.weighted
            for fraction in grid.ignore_fractions
        ]
        if all(reasons):
            raise UsageError(f"{reasons[0]}: nothing to measure with these --weighted and --ignore-fraction")


@dataclass
class Plan:
    """One device's sweep: the preset's grids with the options applied, and their cases as one sweep."""

    device: str
    grids: list[grids.Grid]
    preset: str | None  # the preset's name when its grids are unchanged, else None
    cases: list[Case]

    def grid_record(self) -> dict | list[dict]:
        """What metadata.json records as the grid: its fields, or each grid's where there are several."""
        fields = [grid.as_dict() for grid in self.grids]
        return fields[0] if len(fields) == 1 else fields


def _with_options(args, base: grids.Grid | grids.HeadGrid) -> grids.Grid | grids.HeadGrid:
    """`base` with each axis the command line names replaced (of a head grid: --batch its tokens,
    --classes its vocabulary, --hidden its H)."""
    if isinstance(base, grids.HeadGrid):
        if args.ignore_fraction or args.weighted:
            raise UsageError(
                "--ignore-fraction and --weighted are axes of the logits losses, not of --preset head"
            )
        return grids.HeadGrid(
            implementations=args.impl or base.implementations,
            devices=base.devices,
            dtypes=args.dtype or base.dtypes,
            tokens=args.batch or base.tokens,
            hidden=args.hidden or base.hidden,
            vocab=args.classes or base.vocab,
            smoothings=args.smoothing or base.smoothings,
            passes=args.pass_ or base.passes,
            threads=args.threads or base.threads,
        )
    if args.hidden:
        raise UsageError("--hidden is an axis of the head presets (--preset head)")
    return grids.Grid(
        implementations=args.impl or base.implementations,
        devices=base.devices,
        dtypes=args.dtype or base.dtypes,
        batches=args.batch or base.batches,
        classes=args.classes or base.classes,
        smoothings=args.smoothing or base.smoothings,
        passes=args.pass_ or base.passes,
        ignore_fractions=args.ignore_fraction or base.ignore_fractions,
        weighted=[SWITCH[w] for w in args.weighted] if args.weighted else base.weighted,
        threads=args.threads or base.threads,
    )


def plans(args) -> list[Plan]:
    """A plan per device: every grid of the preset there (its implementations those that run on the
    device), each with the options given, swept together; checked before anything is measured."""
    devices = args.device or grids.present_devices()
    missing = [d for d in devices if d not in grids.present_devices()]
    if missing:
        raise UsageError(f"device {', '.join(missing)} is not present on this machine")
    plans = []
    for device in devices:
        bases = [  # a head grid keeps every head loss: its rows say why one cannot run here
            base
            if isinstance(base, grids.HeadGrid)
            else replace(
                base, implementations=[n for n in base.implementations if lsr.get(n).runs_on(device)]
            )
            for base in grids.preset_grids(args.preset, device)
        ]
        if not bases:
            continue
        chosen = []
        for grid in map(functools.partial(_with_options, args), bases):  # options may make two alike
            if all(grid.as_dict() != other.as_dict() for other in chosen):
                chosen.append(grid)
        _check_named(args.impl or [], device, chosen)
        cases = grids.cases_of(chosen)
        if not any(not case.is_floor for case in cases):
            raise UsageError(f"no implementation has a case on {device} with these options")
        unchanged = [g.as_dict() for g in chosen] == [b.as_dict() for b in bases]
        plans.append(Plan(device, chosen, args.preset if unchanged else None, cases))
    return plans
