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
import csv
import json
import math
import pickle
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lsr
from lsr.experiments import DEFAULT_OUT
from lsr.experiments.approximation import approximation_error

# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Dataset:
    """Images as float32 (N, channels, H, W) tensors and int64 labels, already normalised."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    augment: bool  # random crop + horizontal flip while training (CIFAR-10, as the paper)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` samples (the splits are already shuffled), or all of them."""
    return (x, y) if limit is None else (x[:limit], y[:limit])


def load_digits_dataset(
    max_train: int | None = None, max_test: int | None = None, test_fraction: float = 0.3, split_seed: int = 0
) -> Dataset:
    """scikit-learn's 1797 8x8 digit images, a fixed stratified train/test split, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'lsr-bench[experiments]'"
        ) from exc
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=split_seed, stratify=bunch.target
    )
    x_train, y_train = _subset(torch.from_numpy(x_train), torch.from_numpy(y_train).long(), max_train)
    x_test, y_test = _subset(torch.from_numpy(x_test), torch.from_numpy(y_test).long(), max_test)
    return Dataset(
        "digits", x_train, y_train, x_test, y_test, tuple(str(d) for d in range(10)), augment=False
    )


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the training set (the seed's normalisation).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Cifar10NotFoundError(FileNotFoundError):
    """The CIFAR-10 python batches are not where --data-dir says."""


def find_cifar10_dir(data_dir: Path) -> Path:
    """The folder holding data_batch_1..5 and test_batch: `data_dir` itself or its cifar-10-batches-py."""
    needed = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    for candidate in (data_dir, data_dir / CIFAR10_FOLDER):
        if all((candidate / name).is_file() for name in needed):
            return candidate
    missing = [
        name
        for name in needed
        if not (data_dir / name).is_file() and not (data_dir / CIFAR10_FOLDER / name).is_file()
    ]
    raise Cifar10NotFoundError(
        f"CIFAR-10 not found in {data_dir} (missing: {', '.join(missing)}).\n"
        f"lsr-train downloads nothing. Get the python version, cifar-10-python.tar.gz, from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it so that {data_dir / CIFAR10_FOLDER} "
        f"holds {', '.join(needed)}:\n"
        f"    tar -xzf cifar-10-python.tar.gz -C {data_dir}\n"
        f"(the same folder torchvision.datasets.CIFAR10(root={str(data_dir)!r}) uses), then pass --data-dir {data_dir}."
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official batches are Python 2 pickles
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _normalise_cifar(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_cifar10_dataset(
    data_dir: Path, max_train: int | None = None, max_test: int | None = None
) -> Dataset:
    """The 50 000 training and 10 000 test images of CIFAR-10's python batches, normalised."""
    folder = find_cifar10_dir(Path(data_dir))
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    x_train, y_train = _subset(
        _normalise_cifar(np.concatenate([b[0] for b in train])),
        torch.from_numpy(np.concatenate([b[1] for b in train])),
        max_train,
    )
    x_test, y_test = _subset(_normalise_cifar(test_images), torch.from_numpy(test_labels), max_test)
    return Dataset("cifar10", x_train, y_train, x_test, y_test, CIFAR10_CLASSES, augment=True)


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip (the paper's CIFAR-10 augmentation)."""
    n, _, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).tolist()
    crops = torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    )
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


# ---------------------------------------------------------------------------------------------
# Models: `features` ends at the penultimate layer, whose output t-SNE draws; `classifier` maps it
# to logits.


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, a max pool and two linear layers, for 8x8 single-channel digits."""

    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4 * 4, hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    """The paper's AlexNet-style network for 32x32 RGB images (Krizhevsky et al., CIFAR-sized)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(4096, num_classes)
        for module in self.modules():  # the seed's initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[[int], nn.Module]] = {"digits": SmallCNN, "cifar10": AlexNet}

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
# Progress


class ProgressBar:
    """A one-line text progress bar on stderr, redrawn at most every `min_interval` seconds."""

    def __init__(
        self, total: int, label: str, stream: TextIO | None = None, width: int = 30, min_interval: float = 0.1
    ):
        self.total, self.label, self.width, self.min_interval = max(total, 1), label, width, min_interval
        self.stream = sys.stderr if stream is None else stream
        self.done, self.status, self._last_draw = 0, "", 0.0

    def update(self, steps: int = 1, status: str = "") -> None:
        self.done = min(self.done + steps, self.total)
        self.status = status or self.status
        now = time.monotonic()
        if now - self._last_draw >= self.min_interval or self.done == self.total:
            self._draw()
            self._last_draw = now

    def close(self, status: str = "") -> None:
        self.status = status or self.status
        self._draw()
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self) -> None:
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} |{bar}| {self.done}/{self.total} {self.status}\x1b[K")
        self.stream.flush()


class _NoProgress(ProgressBar):
    def _draw(self) -> None:
        pass

    def close(self, status: str = "") -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass(frozen=True)
class TrainSettings:
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


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(
    model: nn.Module,
    data: Dataset,
    loss: LossSpec,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    progress: ProgressBar,
) -> list[float]:
    """SGD (Nesterov) with cosine learning-rate decay; returns each step's wall time in seconds."""
    optimiser = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    steps_per_epoch = math.ceil(len(data.y_train) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=settings.epochs * steps_per_epoch)
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
            progress.update(1, f"epoch {epoch + 1}/{settings.epochs} loss {value.item():.3f}")
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
    train_seconds: float
    sparse_rel_loss_error: float
    sparse_grad_cosine: float


WARMUP_STEPS = 5
METRIC_NAMES = ("accuracy", "ece", "nll", "ms_per_step", "sparse_rel_loss_error", "sparse_grad_cosine")


def median_ms(step_times: Sequence[float]) -> float:
    timed = step_times[WARMUP_STEPS:] or step_times
    return 1000 * statistics.median(timed)


def run_one(
    data: Dataset,
    loss: LossSpec,
    settings: TrainSettings,
    seed: int,
    smoothing: float,
    device: torch.device,
    progress: ProgressBar,
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


# ---------------------------------------------------------------------------------------------
# Outputs


def tsne_embedding(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (N, D) features (perplexity capped for small N, which t-SNE requires)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
    # Barnes-Hut can crawl on near-degenerate features (barely trained models); exact is quick for a few hundred points.
    method = "exact" if len(features) <= 250 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=seed)
    return tsne.fit_transform(features.double().numpy())


def plot_tsne(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    titles: dict[str, str],
    path: Path,
) -> Path:
    """One t-SNE scatter per loss, points coloured by true class."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    count = len(embeddings)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(5.2 * columns + 1.6, 5 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    colours = colormaps["tab10"](np.arange(len(class_names)) % 10)
    for ax, (name, points) in zip(axes, embeddings.items(), strict=False):
        for k, class_name in enumerate(class_names):
            mask = labels == k
            ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colours[k], label=class_name)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="class", markerscale=3)
    fig.suptitle("t-SNE of the penultimate layer on the test set, one model per loss (first seed)")
    fig.savefig(path, dpi=110)
    return path


def write_runs_csv(runs: Sequence[RunResult], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(runs[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in runs)
    return path


def _pm(row: dict, metric: str, scale: float = 1.0, digits: int = 3) -> str:
    mean, std = scale * row[f"{metric}_mean"], scale * row[f"{metric}_std"]
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(summary: Sequence[dict], meta: dict) -> str:
    """The summary table and the settings, with the command that produced them."""
    lines = [
        f"# Training comparison: {meta['dataset']}",
        "",
        "Command:",
        "",
        f"    {meta['command']}",
        "",
        f"{meta['model']}, {meta['epochs']} epochs, batch {meta['batch_size']}, SGD (Nesterov, momentum "
        f"{meta['momentum']}, weight decay {meta['weight_decay']}) with lr {meta['lr']} and cosine decay; "
        f"smoothing {meta['smoothing']} for every smoothed loss; seeds {meta['seeds']}; "
        f"{meta['train_size']} training and {meta['test_size']} test samples; device {meta['device']}, "
        f"{meta['threads']} threads, torch {meta['torch']}. Total time {meta['total_seconds']:.0f} s.",
        "",
        "Mean ± sample standard deviation over the seeds. ECE: 15 equal-width bins, top label. "
        "NLL: plain cross-entropy of the test logits. Time per step: median wall time of forward, backward "
        "and optimiser step. The last two columns apply SparseLSR and exact LSR to the trained model's own "
        "test logits (at the run's smoothing): SparseLSR's relative loss error and the cosine between their "
        "gradients.",
        "",
        "| loss | seeds | test accuracy (%) | ECE (%) | NLL | ms / step | SparseLSR rel. loss error | grad cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['label']} | {row['seeds']} | {_pm(row, 'accuracy', 100, 2)} | {_pm(row, 'ece', 100, 2)} | "
            f"{_pm(row, 'nll', 1, 3)} | {_pm(row, 'ms_per_step', 1, 2)} | {_pm(row, 'sparse_rel_loss_error', 1, 4)} | "
            f"{_pm(row, 'sparse_grad_cosine', 1, 3)} |"
        )
    lines += ["", f"t-SNE of the penultimate layer: `{meta['tsne_file']}`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass
class Experiment:
    dataset: str
    losses: list[str]
    seeds: list[int]
    smoothing: float
    settings: TrainSettings
    device: torch.device
    out: Path
    data_dir: Path | None = None
    max_train: int | None = None
    max_test: int | None = None
    tsne_samples: int = 2000
    progress: bool = True
    command: str = ""
    outputs: dict[str, Path] = field(default_factory=dict)


def load_dataset(exp: Experiment) -> Dataset:
    if exp.dataset == "digits":
        return load_digits_dataset(exp.max_train, exp.max_test)
    if exp.data_dir is None:
        raise Cifar10NotFoundError(
            "--dataset cifar10 needs --data-dir, the folder holding cifar-10-batches-py"
        )
    return load_cifar10_dataset(exp.data_dir, exp.max_train, exp.max_test)


def run_experiment(exp: Experiment) -> dict[str, Path]:
    """Train every (loss, seed), then write the runs, the summary and the t-SNE figure."""
    began = time.perf_counter()
    data = load_dataset(exp)
    losses = [make_loss(name, exp.smoothing) for name in exp.losses]
    runs: list[RunResult] = []
    first_seed_features: dict[str, torch.Tensor] = {}
    steps = exp.settings.epochs * math.ceil(len(data.y_train) / exp.settings.batch_size)
    total_runs = len(losses) * len(exp.seeds)
    for run_index, (loss, seed) in enumerate(
        ((loss, seed) for loss in losses for seed in exp.seeds), start=1
    ):
        label = f"[{run_index:>2}/{total_runs}] {loss.name:<13} seed {seed}"
        bar = ProgressBar(steps, label) if exp.progress else _NoProgress(steps, label)
        result, features = run_one(data, loss, exp.settings, seed, exp.smoothing, exp.device, bar)
        bar.close(f"test accuracy {100 * result.accuracy:.2f}%, {result.ms_per_step:.1f} ms/step")
        runs.append(result)
        first_seed_features.setdefault(loss.name, features)

    exp.out.mkdir(parents=True, exist_ok=True)
    prefix = exp.out / f"train_{data.name}"
    summary = summarise(runs)
    # t-SNE on a fixed subset of the test set, the same points for every loss.
    subset = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(0))[: exp.tsne_samples]
    embeddings = {name: tsne_embedding(feats[subset]) for name, feats in first_seed_features.items()}
    first_accuracy = {r.loss: r.accuracy for r in reversed(runs)}  # each loss's first-seed run
    titles = {
        row[
            "loss"
        ]: f"{row['label']}\nthis model (seed {exp.seeds[0]}): {100 * first_accuracy[row['loss']]:.2f}%; "
        f"all seeds: {_pm(row, 'accuracy', 100, 2)}%"
        for row in summary
    }
    tsne_path = plot_tsne(
        embeddings, data.y_test[subset].numpy(), data.class_names, titles, Path(f"{prefix}_tsne.png")
    )
    meta = {
        "dataset": data.name,
        "command": exp.command,
        "model": MODELS[data.name].__name__,
        **asdict(exp.settings),
        "smoothing": exp.smoothing,
        "seeds": exp.seeds,
        "losses": exp.losses,
        "train_size": len(data.y_train),
        "test_size": len(data.y_test),
        "device": str(exp.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "total_seconds": time.perf_counter() - began,
        "tsne_file": tsne_path.name,
    }
    paths = {
        "runs": write_runs_csv(runs, Path(f"{prefix}_runs.csv")),
        "summary_json": Path(f"{prefix}_summary.json"),
        "summary_md": Path(f"{prefix}_summary.md"),
        "tsne": tsne_path,
    }
    paths["summary_json"].write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}, indent=2) + "\n"
    )
    paths["summary_md"].write_text(summary_markdown(summary, meta))
    return paths


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "lsr-train " + shlex.join(sys.argv[1:] if argv is None else argv)
    exp = experiment_from_args(args, command.strip(), parser)
    try:
        paths = run_experiment(exp)
    except Cifar10NotFoundError as exc:
        parser.exit(2, f"lsr-train: error: {exc}\n")
    for path in paths.values():
        print(path)
    return paths


if __name__ == "__main__":
    main()
