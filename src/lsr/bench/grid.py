"""What is benchmarked: the one definition of cases and sweep grids, read by the CLI, asv and pytest-benchmark."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

import lsr
from lsr.bench.results import FLOORS, PASSES, Case, Pass
from lsr.types import Device


@dataclass(frozen=True)
class Grid:
    """A sweep: the cross product of its axes, and the two floor cases per (device, dtype, batch, classes).

    ignore_fractions: fractions of the targets set to ignore_index (padding); weighted: class weights
    off (False) and/or on (True). An implementation is left out of the cases it cannot take (too few
    classes, a dtype, class weights or ignored targets it does not support, a device it does not run on).
    """

    implementations: Sequence[str]
    devices: Sequence[str]
    dtypes: Sequence[str]
    batches: Sequence[int]
    classes: Sequence[int]
    smoothings: Sequence[float] = (0.1,)
    passes: Sequence[Pass] = PASSES
    ignore_fractions: Sequence[float] = (0.0,)
    weighted: Sequence[bool] = (False,)

    def cases(self) -> Iterator[Case]:
        """The floors first for each size, then, for each (ignore fraction, weights) in turn (one set of
        inputs each), every implementation that takes the case."""
        for device, dtype, batch, classes in itertools.product(
            self.devices, self.dtypes, self.batches, self.classes
        ):
            # The floors have no smoothing, targets or weights: recorded once per size, under the
            # sweep's first smoothing value, with no ignored target and no weights.
            for floor in FLOORS:
                yield Case(floor, device, dtype, batch, classes, self.smoothings[0], "forward+backward")
            for ignore_fraction, weighted in itertools.product(self.ignore_fractions, self.weighted):
                for name, smoothing, pass_ in itertools.product(
                    self.implementations, self.smoothings, self.passes
                ):
                    impl = lsr.get(name)
                    if not impl.can_repeat_backward and pass_ == "backward":
                        continue  # it cannot run backward twice through one graph
                    refused = impl.unsupported(
                        classes=classes, dtype=dtype, weighted=weighted, ignoring=ignore_fraction > 0
                    )
                    if impl.runs_on(device) and refused is None:
                        case = (
                            name,
                            device,
                            dtype,
                            batch,
                            classes,
                            smoothing,
                            pass_,
                            ignore_fraction,
                            weighted,
                        )
                        yield Case(*case)

    def as_dict(self) -> dict[str, list]:
        """The axes as lists: what metadata.json records, and equal for equal grids whatever
        sequence types they were given as."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def cases_of(grids: Iterable[Grid]) -> list[Case]:
    """The cases of several grids (a preset's, for one device) as one sweep: each case once, every
    size's cases together (floors first), and within a size each (ignore fraction, weights) together,
    in the order the grids first name them, so that each set of inputs is made once. A floor is
    measured once per size, under the smoothing of the first grid that has the size."""
    first: dict = {}
    for case in (case for grid in grids for case in grid.cases()):
        floor_size = (case.implementation, case.device, case.dtype, case.batch, case.classes)
        first.setdefault(floor_size if case.is_floor else case, case)
    unique = list(first.values())
    sizes: dict[tuple, int] = {}
    variants: dict[tuple, int] = {}
    for case in unique:
        size = (case.device, case.dtype, case.batch, case.classes)
        sizes.setdefault(size, len(sizes))
        variants.setdefault((*size, case.ignore_fraction, case.weighted), len(variants))

    def order(case: Case) -> tuple:
        size = (case.device, case.dtype, case.batch, case.classes)
        return sizes[size], variants[(*size, case.ignore_fraction, case.weighted)], not case.is_floor

    return sorted(unique, key=order)


def present_devices() -> list[Device]:
    """The device types this machine has: cpu, plus cuda and mps when present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def registered() -> list[str]:
    return list(lsr.REGISTRY)


# The case axes a user's training has, beside the plain sweep: plain cross-entropy (smoothing 0) as
# the baseline of smoothing, padding-heavy batches (30% of targets ignored), and class weights.
SMOOTHINGS = (0.0, 0.1)
IGNORE_FRACTIONS = (0.0, 0.3)
WEIGHTED = (False, True)


def field(device: str, dtypes: Sequence[str], batch: int, classes: int) -> Grid:
    """Every implementation on the cases a user has, at one size: each smoothing, ignore fraction and
    weighting, forward+backward (what a training step runs)."""
    return Grid(
        registered(),
        [device],
        dtypes,
        [batch],
        [classes],
        smoothings=SMOOTHINGS,
        passes=["forward+backward"],
        ignore_fractions=IGNORE_FRACTIONS,
        weighted=WEIGHTED,
    )


# Presets: a device's grids, one per concern, swept together (`cases_of`) into one run. The new case
# axes are crossed at one mid size only (`field`), so that they do not multiply every size.
# CPU durations, estimated for an idle 2-core AMD EPYC (the machine of results/cpu) with native,
# dense, sparse, fused-exact, fused-sparse, fused-exact-inplace and native-compiled registered:
# each case's calls (0.5 s min_time or 7 calls, 2 warm-up calls, the gate, the 2 memory meters)
# from results/cpu/results.csv's medians (bfloat16, floor-alloc, native-compiled and the new axes
# scaled by spot measurements), 0.12 s a case besides, and the compilations of native-compiled and
# the fused losses (40 s quick, 100 s full). The model reproduced a measured quick run within 2%.
#   quick, 184 cases, about 3 minutes: float32 N 256, 1024, 4096 x C 1000, 4096, smoothing 0.1,
#     every pass; at N 1024 x C 4096 float32 the field (forward+backward); bfloat16 there too.
#   full, 779 cases, about 18 minutes: float32 N 256, 1024, 4096 x C 100, 1000, 10000, 32768,
#     smoothing 0 and 0.1, every pass (504 cases, 9 minutes); bfloat16 N 256, 1024, 4096 x
#     C 1000, 10000, 32768, smoothing 0.1, every pass (198, 4.5 minutes); at N 1024 x C 32768 in
#     float32 and bfloat16 the field (77 more, 3 minutes); compilation under 2 minutes.
# Accelerators get larger sizes: their fixed launch costs hide everything below about 1M logits.
PRESETS: dict[str, dict[str, tuple[Grid, ...]]] = {
    "quick": {
        "cpu": (
            Grid(registered(), ["cpu"], ["float32"], batches=[256, 1024, 4096], classes=[1000, 4096]),
            field("cpu", ["float32"], 1024, 4096),
            Grid(registered(), ["cpu"], ["bfloat16"], [1024], [4096], passes=["forward+backward"]),
        ),
        "cuda": (
            Grid(
                registered(), ["cuda"], ["float32", "bfloat16"], batches=[1024, 8192], classes=[4096, 32768]
            ),
            field("cuda", ["float32", "bfloat16"], 8192, 32768),
        ),
        "mps": (Grid(registered(), ["mps"], ["float32"], batches=[1024, 4096], classes=[4096]),),
    },
    "full": {
        "cpu": (
            Grid(
                registered(),
                ["cpu"],
                ["float32"],
                batches=[256, 1024, 4096],
                classes=[100, 1000, 10000, 32768],
                smoothings=SMOOTHINGS,
            ),
            Grid(
                registered(), ["cpu"], ["bfloat16"], batches=[256, 1024, 4096], classes=[1000, 10000, 32768]
            ),
            field("cpu", ["float32", "bfloat16"], 1024, 32768),
        ),
        "cuda": (
            Grid(
                registered(),
                ["cuda"],
                ["float32", "bfloat16"],
                batches=[1024, 4096, 16384, 65536],
                classes=[1000, 10000, 32768, 131072],
                smoothings=SMOOTHINGS,
            ),
            field("cuda", ["float32", "bfloat16"], 16384, 32768),
        ),
    },
}
PRESETS["full"]["mps"] = PRESETS["quick"]["mps"]

# The asv and pytest-benchmark suites. "fast" keeps `asv run` over several commits quick; "full" is
# the CPU sweep's grid. Chosen by LSR_ASV_PROFILE (read when a suite is collected, not at import).
SUITE_PROFILES = {
    "fast": dict(dtypes=["float32"], batches=[512, 4096], classes=[1000, 10000]),
    "full": dict(dtypes=["float32"], batches=[256, 1024, 4096], classes=[100, 1000, 10000, 32768]),
}
SUITE_PROFILE_VARIABLE = "LSR_ASV_PROFILE"


def suite(profile: str | None = None, devices: Sequence[str] | None = None) -> Grid:
    """The benchmark suites' grid: `profile` (default: $LSR_ASV_PROFILE, else "fast") on `devices`
    (default: those present here)."""
    profile = profile or os.environ.get(SUITE_PROFILE_VARIABLE) or "fast"
    if profile not in SUITE_PROFILES:
        raise ValueError(f"unknown suite profile {profile!r}; choose from {', '.join(SUITE_PROFILES)}")
    return Grid(registered(), list(devices or present_devices()), **SUITE_PROFILES[profile])


def preset_grids(name: str, device: str) -> list[Grid]:
    """The grids of preset `name` on `device` (none where the preset has no grid for it); sweep them
    together with `cases_of`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    grids = PRESETS[name].get(device, ())
    return [grids] if isinstance(grids, Grid) else list(grids)


def preset(name: str, devices: Sequence[str]) -> list[Grid]:
    """The grids of preset `name` on each of `devices` in turn: several a device, each device's together."""
    return [grid for device in devices for grid in preset_grids(name, device)]
