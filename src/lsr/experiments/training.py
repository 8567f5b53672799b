"""Training and evaluating one (loss, seed) run of `lsr-train`, and summarising runs per loss.

- losses: `LossSpec`, `available_loss_names`, `make_loss` (CE, exact LSR, SparseLSR, and the other
  registered implementations);
- settings: `TrainSettings` and the per-dataset `DEFAULT_SETTINGS`;
- the SGD loop (`train_model`), `predict`, the test metrics (`expected_calibration_error`,
  `evaluate_test_set`), `run_one` and `summarise`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import lsr
from lsr.experiments.approximation import approximation_error
from lsr.experiments.data import Dataset, augment_batch
from lsr.experiments.models import MODELS

# ---------------------------------------------------------------------------------------------
# Losses


@dataclass(frozen=True)
class LossSpec:
    """A training loss: `name` on the command line, `label` in tables and figures."""

    name: str
    label: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean loss


# The three the paper compares; registry implementations are added after them.
BASE_LOSSES = {"ce": "CE", "lsr": "LSR (native)", "sparse": "SparseLSR"}
REGISTRY_NAME = {"lsr": "native", "sparse": "sparse"}
# Registry entries that duplicate a base loss (dense computes what native does, more slowly).
NOT_TRAINED = {"native", "dense", "sparse"}


def available_loss_names(device: str) -> list[str]:
    """ce, lsr, sparse, then every other registered implementation that runs on `device`."""
    extra = [impl.name for impl in lsr.available(device) if impl.name not in NOT_TRAINED]
    return [*BASE_LOSSES, *extra]


def make_loss(name: str, smoothing: float) -> LossSpec:
    """The loss called `name` (see `available_loss_names`) at the given smoothing."""
    if name == "ce":
        return LossSpec("ce", BASE_LOSSES["ce"], lambda z, y: F.cross_entropy(z, y))
    impl = lsr.get(REGISTRY_NAME.get(name, name))
    label = BASE_LOSSES.get(name, f"{impl.name} ({impl.smoothing_kind})")
    return LossSpec(name, label, lambda z, y: impl.loss(z, y, smoothing))


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TrainSettings:
    """The optimiser's settings: SGD with Nesterov momentum and cosine learning-rate decay."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4


# Per-dataset defaults: digits is sized for minutes on 2 CPU cores; CIFAR-10 follows the seed's
# optimiser (SGD, lr 0.01, Nesterov momentum 0.9, weight decay 5e-4, batch 128).
DEFAULT_SETTINGS = {
    "digits": TrainSettings(epochs=20, batch_size=64, lr=0.05),
    "cifar10": TrainSettings(epochs=30, batch_size=128, lr=0.01),
}


def training_steps(settings: TrainSettings, train_size: int) -> int:
    """Optimiser steps in a whole run: epochs x batches per epoch (the last batch may be short)."""
    return settings.epochs * math.ceil(train_size / settings.batch_size)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so that a step's wall time covers the step itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(
    model: nn.Module,
    data: Dataset,
    loss: LossSpec,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    progress: tqdm,
) -> list[float]:
    """SGD (Nesterov) with cosine learning-rate decay; returns each step's wall time in seconds."""
    optimiser = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=training_steps(settings, len(data.y_train))
    )
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
    step_times = []
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            x = data.x_train[index]
            x = augment_batch(x, generator) if data.augment else x
            x, y = x.to(device), data.y_train[index].to(device)
            _synchronise(device)
            began = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            value = loss.fn(model(x), y)
            value.backward()
            optimiser.step()
            _synchronise(device)
            step_times.append(time.perf_counter() - began)
            schedule.step()
            progress.set_postfix_str(
                f"epoch {epoch + 1}/{settings.epochs} loss {value.item():.3f}", refresh=False
            )
            progress.update(1)
    return step_times


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate-layer features of `x`, on the CPU."""
    model.eval()
    logits, features = [], []
    for start in range(0, len(x), batch_size):
        feats = model.features(x[start : start + batch_size].to(device))
        features.append(feats.cpu())
        logits.append(model.classifier(feats).cpu())
    return torch.cat(logits), torch.cat(features)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| x bin share.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1])), 4)  # (|1-.9| + |0-.6|) / 2
        0.35
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    # Bin k holds confidences in (k/bins, (k+1)/bins]; confidence is at least 1/C > 0.
    bin_index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    for k in range(bins):
        in_bin = bin_index == k
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].double().mean()).abs()
            total += float(gap) * float(in_bin.double().mean())
    return total


def evaluate_test_set(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> dict[str, float]:
    """Accuracy, ECE and NLL of the test logits, and SparseLSR's error against exact LSR on them."""
    probs = torch.softmax(logits.double(), dim=1)
    errors = approximation_error(logits.double(), labels, smoothing)
    return {
        "accuracy": float((probs.argmax(dim=1) == labels).double().mean()),
        "ece": expected_calibration_error(probs, labels),
        "nll": float(F.cross_entropy(logits.double(), labels)),
        "sparse_rel_loss_error": float(errors["rel_loss_error"].nanmean()),
        "sparse_grad_cosine": float(errors["grad_cosine"].nanmean()),
    }


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunResult:
    """One (loss, seed) training run."""

    dataset: str
    loss: str
    label: str
    seed: int
    accuracy: float
    ece: float
    nll: float
    ms_per_step: float  # median over the run's steps after the first WARMUP_STEPS
    warmup_ms: float  # the first WARMUP_STEPS steps' mean (compilation and first touches), apart
    train_seconds: float
    sparse_rel_loss_error: float
    sparse_grad_cosine: float


WARMUP_STEPS = 5
METRIC_NAMES = (
    "accuracy",
    "ece",
    "nll",
    "ms_per_step",
    "warmup_ms",
    "sparse_rel_loss_error",
    "sparse_grad_cosine",
)


def median_ms(step_times: Sequence[float]) -> float:
    """Median step time in milliseconds, leaving out the warm-up steps when there are more."""
    timed = step_times[WARMUP_STEPS:] or step_times
    return 1000 * statistics.median(timed)


def warmup_ms(step_times: Sequence[float]) -> float:
    """The warm-up steps' mean time in milliseconds: what `median_ms` leaves out, reported apart."""
    return 1000 * statistics.fmean(step_times[:WARMUP_STEPS]) if step_times else float("nan")


def run_one(
    data: Dataset,
    loss: LossSpec,
    settings: TrainSettings,
    seed: int,
    smoothing: float,
    device: torch.device,
    progress: tqdm,
) -> tuple[RunResult, torch.Tensor]:
    """Train from seed `seed`; returns the run's results and its penultimate test features."""
    torch.manual_seed(seed)  # the same initial weights for every loss
    model = MODELS[data.name](data.num_classes).to(device)
    began = time.perf_counter()
    step_times = train_model(model, data, loss, settings, seed, device, progress)
    seconds = time.perf_counter() - began
    logits, features = predict(model, data.x_test, device)
    metrics = evaluate_test_set(logits, data.y_test, smoothing)
    result = RunResult(
        data.name,
        loss.name,
        loss.label,
        seed,
        ms_per_step=median_ms(step_times),
        warmup_ms=warmup_ms(step_times),
        train_seconds=seconds,
        **metrics,
    )
    return result, features


def summarise(runs: Sequence[RunResult]) -> list[dict[str, float | str | int]]:
    """Per loss, in first-seen order: mean and sample standard deviation of every metric."""
    rows = []
    for name in dict.fromkeys(r.loss for r in runs):
        mine = [r for r in runs if r.loss == name]
        row: dict[str, float | str | int] = {"loss": name, "label": mine[0].label, "seeds": len(mine)}
        for metric in METRIC_NAMES:
            values = [getattr(r, metric) for r in mine]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        rows.append(row)
    return rows
