"""What is benchmarked: the one definition of cases and sweep grids, read by the CLI, asv and pytest-benchmark."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

import lsr

PASSES = ("forward", "backward", "forward+backward")
FLOOR = "floor"  # the implementation name of the floor rows: torch.exp(z, out=buf) on the same logits
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Case:
    """One measurement: an implementation (or the floor) on one problem size, for one pass."""

    implementation: str
    device: str
    dtype: str
    batch: int
    classes: int
    smoothing: float
    pass_: str

    def key(self) -> tuple:
        return (
            self.implementation,
            self.device,
            self.dtype,
            self.batch,
            self.classes,
            self.smoothing,
            self.pass_,
        )

    @property
    def is_floor(self) -> bool:
        return self.implementation == FLOOR

    def as_dict(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        return row


@dataclass(frozen=True)
class Grid:
    """A sweep: the cross product of its axes, and one floor case per (device, dtype, batch, classes)."""

    implementations: Sequence[str]
    devices: Sequence[str]
    dtypes: Sequence[str]
    batches: Sequence[int]
    classes: Sequence[int]
    smoothings: Sequence[float] = (0.1,)
    passes: Sequence[str] = PASSES

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


def present_devices() -> list[str]:
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

# The asv and pytest-benchmark suites: a small grid, so that `asv run` over several commits stays quick.
SUITE = Grid(registered(), present_devices(), ["float32"], batches=[512, 4096], classes=[1000, 10000])


def preset(name: str, devices: Sequence[str]) -> list[Grid]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return [PRESETS[name][device] for device in devices if device in PRESETS[name]]
