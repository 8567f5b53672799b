"""What is benchmarked: the one definition of cases and sweep grids, read by the CLI, asv and pytest-benchmark."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch

import lsr
import lsr.heads
from lsr.bench.data import FLOORS, FWD_BWD, PASSES, Case, Pass
from lsr.types import Device

ALL_CORES = "all"  # a Grid's threads value: torch's intra-op thread count when the cases are made


def thread_count(threads: int | str) -> int:
    """A threads axis value as a count: ALL_CORES is torch's current intra-op thread count."""
    return torch.get_num_threads() if threads == ALL_CORES else int(threads)


@dataclass(frozen=True)
class Grid:
    """A sweep: the cross product of its axes, and the two floor cases per (device, dtype, batch,
    classes, threads).

    ignore_fractions: fractions of the targets set to ignore_index (padding); weighted: class weights
    off (False) and/or on (True); threads: torch intra-op thread counts, ALL_CORES for torch's own
    (every core unless told otherwise). An implementation is left out of the cases it cannot take (too
    few classes, a dtype, class weights or ignored targets it does not support, a device it does not
    run on).
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
    threads: Sequence[int | str] = (ALL_CORES,)

    def cases(self) -> Iterator[Case]:
        """For each size and thread count, the floors first, then, for each (ignore fraction, weights)
        in turn (one set of inputs each), every implementation that takes the case."""
        thread_counts = dict.fromkeys(map(thread_count, self.threads))
        for device, dtype, batch, classes, threads in itertools.product(
            self.devices, self.dtypes, self.batches, self.classes, thread_counts
        ):
            # The floors have no smoothing, targets or weights: recorded once per size, under the
            # sweep's first smoothing value, with no ignored target and no weights.
            for floor in FLOORS:
                yield Case(floor, device, dtype, batch, classes, self.smoothings[0], FWD_BWD, threads=threads)
            for ignore_fraction, weighted in itertools.product(self.ignore_fractions, self.weighted):
                for name, smoothing, pass_ in itertools.product(
                    self.implementations, self.smoothings, self.passes
                ):
                    case = (name, device, dtype, batch, classes, smoothing, pass_, ignore_fraction, weighted)
                    if takes(lsr.get(name), Case(*case, threads=threads)):
                        yield Case(*case, threads=threads)

    def as_dict(self) -> dict[str, list]:
        """The axes as lists: what metadata.json records, and equal for equal grids whatever
        sequence types they were given as."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def cases_of(grids: Iterable[Grid]) -> list[Case]:
    """The cases of several grids (a preset's, for one device; `Grid`s or `HeadGrid`s) as one sweep: each case once, every
    size's cases together (floors first), and within a size each (ignore fraction, weights) together,
    in the order the grids first name them, so that each set of inputs is made once. A floor is
    measured once per size and thread count, under the smoothing of the first grid that has them."""
    first: dict = {}
    for case in (case for grid in grids for case in grid.cases()):
        floor_size = (
            case.implementation,
            case.device,
            case.dtype,
            case.batch,
            case.classes,
            case.hidden,
            case.threads,
        )
        first.setdefault(floor_size if case.is_floor else case, case)
    unique = list(first.values())
    sizes: dict[tuple, int] = {}
    variants: dict[tuple, int] = {}
    for case in unique:
        size = (case.device, case.dtype, case.batch, case.classes, case.hidden)
        sizes.setdefault(size, len(sizes))
        variants.setdefault((*size, case.ignore_fraction, case.weighted), len(variants))

    def order(case: Case) -> tuple:
        size = (case.device, case.dtype, case.batch, case.classes, case.hidden)
        return sizes[size], variants[(*size, case.ignore_fraction, case.weighted)], not case.is_floor

    return sorted(unique, key=order)


def implementation_of(case: Case) -> lsr.Implementation | lsr.heads.HeadImplementation | None:
    """The registry entry a case measures: a logits loss (`lsr.registry`), a head loss (`lsr.heads`,
    where `case.is_head`), or None for a floor."""
    if case.is_floor:
        return None
    return lsr.heads.get(case.implementation) if case.is_head else lsr.get(case.implementation)


def why_not(impl: lsr.Implementation | lsr.heads.HeadImplementation, case: Case) -> str | None:
    """Why `impl` cannot take `case` on any machine (a sentence), or None: the one eligibility check,
    which the grid uses to leave such cases out and `refusal` to record them."""
    if case.is_head:
        reason = impl.unsupported(dtype=case.dtype, smoothing=case.smoothing)
    else:
        reason = impl.unsupported(
            classes=case.classes,
            dtype=case.dtype,
            reduction="mean",  # the timed one
            weighted=case.weighted,
            ignoring=case.ignore_fraction > 0,
        )
    if reason is None and not impl.can_repeat_backward and case.pass_ == "backward":
        reason = f"{impl.name}'s backward cannot run twice on one graph"
    return reason


def takes(impl: lsr.Implementation, case: Case) -> bool:
    """Whether `impl` runs on the case's device type and takes the case: a grid's cases."""
    return impl.runs_on(case.device) and why_not(impl, case) is None


def refusal(case: Case) -> dict | None:
    """Why `case` cannot be measured here at all (a status and message for its row), or None."""
    if case.device not in present_devices():
        return {"status": "not-available", "message": f"this machine has no {case.device} device"}
    if case.is_floor:
        return None
    impl = implementation_of(case)
    if not impl.runs_on(case.device):
        return {"status": "not-available", "message": f"{impl.name} does not run on {case.device} here"}
    reason = why_not(impl, case)
    return None if reason is None else {"status": "unsupported", "message": reason}


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
#     float32 and bfloat16 the field (77 more, 3 minutes); compilation under 2 minutes; and at
#     N 4096 x C 1000, 10000, 32768, float32 and bfloat16, forward+backward at 1 thread (the
#     all-cores cases are the grids' above), for the threads chart (about 66 cases).
# Accelerators get larger sizes: their fixed launch costs hide everything below about 1M logits.
#
# CUDA, in two regimes, every implementation forward+backward (what a training step runs), smoothing
# 0.1; a case whose estimated peak exceeds the GPU's free memory is recorded `skipped`:
#   - the language-model regime: N tokens x C, a real model's vocabulary (LM_CLASSES, two of them
#     not multiples of 16), bfloat16 (the targets' dtype) and float32;
#   - the SparseLSR paper's: C 10, 100, 1000 (CIFAR-10, CIFAR-100, ImageNet) at N 128 and 1024,
#     where the launch cost, not bandwidth, decides (see the host_s column);
#   - and the field (smoothing 0 and 0.1, padding, class weights) at one mid size.
# In that order, with the LM regime's float32 sizes last: a run cut short by its time limit loses
# those first.
# Durations are ESTIMATES, not measurements: no GPU was lent to the session that wrote these presets.
# Model: a call moves about k x the logits' bytes at 4 TB/s (the copy rate reported for the lent H200,
# about 4.3 TB/s; for the H100 about 3.0; not measured by this project),
# k from 2 (floors, one-pass) and 3 (fused) to about 12 (dense), about 15 calls a case (warm-up,
# gate, at least 7 timed, wall cross-check, memory meter), at least --min-time 0.05 s of timed calls
# and 0.25 s of overhead a case, and a minute of compilation (Triton, inductor); the per-case
# overhead is the least known term. With the 10 implementations registered (liger included):
#   full, 562 cases, about 5 minutes on one H200 (more on an H100, at 3 TB/s): the LM regime's 30
#     sizes (360 cases, 1.5 minutes of transfers, many of the largest skipped for memory), the paper
#     regime's 12 sizes (130 cases), the field at N 4096 x C 128256 bfloat16 (70 cases).
#     benchmarks/gpu/run.sh gives it 4.5 minutes: by this estimate the last float32 LM sizes are cut.
#   quick, 154 cases, about 2 minutes: bfloat16 N 4096, 16384 x C 50257, 151936, the paper regime at
#     N 1024, the field.
# Replace these estimates with the times the first GPU run measures (its sweep.log and run.log).
LM_BATCHES = (4096, 16384, 65536)
LM_CLASSES = (32000, 50257, 128256, 151936, 262144)  # Llama 2, GPT-2, Llama 3, Qwen2, Gemma 3
PAPER_BATCHES = (128, 1024)
PAPER_CLASSES = (10, 100, 1000)  # CIFAR-10, CIFAR-100, ImageNet
LM_DTYPES = ("bfloat16", "float32")


def scaling(device: str, dtypes: Sequence[str], batch: int, classes: Sequence[int]) -> Grid:
    """Every implementation forward+backward at one thread and at all cores: how each scales with
    threads, beside the floor's own scaling (the memory system's)."""
    return Grid(
        registered(), [device], dtypes, [batch], classes, passes=["forward+backward"], threads=(1, ALL_CORES)
    )


def training_grid(device: str, dtypes: Sequence[str], batches: Sequence[int], classes: Sequence[int]) -> Grid:
    """Every implementation forward+backward at smoothing 0.1: what a training step runs."""
    return Grid(registered(), [device], dtypes, batches, classes, passes=["forward+backward"])


def gpu_grids(device: str, lm: tuple, paper: tuple, field_size: tuple) -> tuple[Grid, ...]:
    """The GPU presets' shape: the LM regime's grid in its first dtype, the paper regime's, the field at
    one size, then the LM regime's other dtypes; each given as (dtypes, batches, classes), the field
    as (dtypes, batch, classes)."""
    lm_dtypes, lm_batches, lm_classes = lm
    paper_dtypes, paper_batches, paper_classes = paper
    first, *others = (training_grid(device, [dtype], lm_batches, lm_classes) for dtype in lm_dtypes)
    return (
        first,
        training_grid(device, paper_dtypes, paper_batches, paper_classes),
        field(device, *field_size),
        *others,
    )


PRESETS: dict[str, dict[str, tuple[Grid, ...]]] = {
    "quick": {
        "cpu": (
            Grid(registered(), ["cpu"], ["float32"], batches=[256, 1024, 4096], classes=[1000, 4096]),
            field("cpu", ["float32"], 1024, 4096),
            Grid(registered(), ["cpu"], ["bfloat16"], [1024], [4096], passes=["forward+backward"]),
        ),
        "cuda": gpu_grids(
            "cuda",
            lm=(["bfloat16"], [4096, 16384], [50257, 151936]),
            paper=(["bfloat16"], [1024], PAPER_CLASSES),
            field_size=(["bfloat16"], 4096, 128256),
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
            scaling("cpu", ["float32", "bfloat16"], 4096, [1000, 10000, 32768]),
        ),
        "cuda": gpu_grids(
            "cuda",
            lm=(LM_DTYPES, LM_BATCHES, LM_CLASSES),
            paper=(LM_DTYPES, PAPER_BATCHES, PAPER_CLASSES),
            field_size=(["bfloat16"], 4096, 128256),
        ),
    },
    # The GPU run's plumbing on CPU (benchmarks/gpu/run.sh --dry-run): the CUDA presets' shape at
    # tiny sizes, a minute or two on 2 cores. Not a measurement of anything.
    "gpu-dry-run": {
        "cpu": gpu_grids(
            "cpu",
            lm=(LM_DTYPES, [64], [320, 1001]),
            paper=(["float32"], [16], [10, 100]),
            field_size=(["bfloat16"], 64, 1001),
        ),
    },
}
PRESETS["full"]["mps"] = PRESETS["quick"]["mps"]


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
