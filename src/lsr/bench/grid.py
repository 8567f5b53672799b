"""What is benchmarked: the one definition of cases and sweep grids, read by the CLI, asv and pytest-benchmark."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

import lsr
from lsr.bench.results import FLOOR, PASSES, Case, Pass
from lsr.types import Device


@dataclass(frozen=True)
class Grid:
    """A sweep: the cross product of its axes, and one floor case per (device, dtype, batch, classes)."""

    implementations: Sequence[str]
    devices: Sequence[str]
    dtypes: Sequence[str]
    batches: Sequence[int]
    classes: Sequence[int]
    smoothings: Sequence[float] = (0.1,)
    passes: Sequence[Pass] = PASSES

    def cases(self) -> Iterator[Case]:
        """Floor first for each size, then every implementation that runs on the device and size."""
        for device, dtype, batch, classes in itertools.product(
            self.devices, self.dtypes, self.batches, self.classes
        ):
            # The floor has no smoothing; it is recorded under the sweep's first smoothing value.
            yield Case(FLOOR, device, dtype, batch, classes, self.smoothings[0], "forward+backward")
            for name, smoothing, pass_ in itertools.product(
                self.implementations, self.smoothings, self.passes
            ):
                impl = lsr.get(name)
                if impl.inplace_backward and pass_ == "backward":
                    continue  # it cannot run backward twice through one graph
                if impl.runs_on(device) and classes >= impl.min_classes:
                    yield Case(name, device, dtype, batch, classes, smoothing, pass_)

    def as_dict(self) -> dict[str, list]:
        """The axes as lists: what metadata.json records, and equal for equal grids whatever
        sequence types they were given as."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


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


# Presets. `quick` stays under 3 minutes on a 2-core CPU; `full` is the sweep committed in results/.
# Accelerators get larger sizes: their fixed launch costs hide everything below about 1M logits.
PRESETS: dict[str, dict[str, Grid]] = {
    "quick": {
        "cpu": Grid(registered(), ["cpu"], ["float32"], batches=[256, 1024, 4096], classes=[1000, 4096]),
        "cuda": Grid(
            registered(), ["cuda"], ["float32", "bfloat16"], batches=[1024, 8192], classes=[4096, 32768]
        ),
    },
    "full": {
        "cpu": Grid(
            registered(), ["cpu"], ["float32"], batches=[256, 1024, 4096], classes=[100, 1000, 10000, 32768]
        ),
        "cuda": Grid(
            registered(),
            ["cuda"],
            ["float32", "bfloat16"],
            batches=[1024, 4096, 16384, 65536],
            classes=[1000, 10000, 32768, 131072],
        ),
    },
}
PRESETS["quick"]["mps"] = Grid(registered(), ["mps"], ["float32"], batches=[1024, 4096], classes=[4096])
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


def preset(name: str, devices: Sequence[str]) -> list[Grid]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return [PRESETS[name][device] for device in devices if device in PRESETS[name]]
