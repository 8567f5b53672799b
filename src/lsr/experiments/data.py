"""The datasets `lsr-train` trains on, as normalised tensors, and the CIFAR-10 augmentation.

- `digits`: scikit-learn's bundled 8x8 digit images, a fixed stratified split;
- `cifar10`: the python-version pickle batches (`cifar-10-batches-py`) from a local folder; nothing
  is downloaded and torchvision is not needed.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    """One pickled batch: uint8 images (N, 3, 32, 32) and int64 labels."""
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the official batches are Python 2 pickles
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _normalise_cifar(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float32, standardised per channel."""
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


def load_dataset(
    name: str, data_dir: Path | None = None, max_train: int | None = None, max_test: int | None = None
) -> Dataset:
    """The dataset called `name` ("digits" or "cifar10"), cut to the first `max_train`/`max_test` samples."""
    if name == "digits":
        return load_digits_dataset(max_train, max_test)
    if data_dir is None:
        raise Cifar10NotFoundError(
            "--dataset cifar10 needs --data-dir, the folder holding cifar-10-batches-py"
        )
    return load_cifar10_dataset(data_dir, max_train, max_test)


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
