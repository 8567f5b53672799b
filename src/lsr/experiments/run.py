"""One `lsr-train` experiment: what to run (`Experiment`) and running it end to end.

`run_experiment` trains every (loss, seed) pair, losses outer, each with a progress bar on stderr,
then writes the t-SNE figure, the runs, and the summary with the run's metadata (the machine and
software from `lsr.bench.measure.machine`, and what was trained).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lsr.bench.measure.machine import environment
from lsr.experiments.data import Dataset, load_dataset
from lsr.experiments.models import MODELS
from lsr.experiments.outputs import draw_tsne, output_path, tsne_titles, write_results
from lsr.experiments.training import (
    RunResult,
    TrainSettings,
    make_loss,
    run_one,
    summarise,
    training_steps,
)


@dataclass
class Experiment:
    """Everything `lsr-train` was asked to do: data, losses, seeds, settings, where to write."""

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


def train_all(exp: Experiment, data: Dataset) -> tuple[list[RunResult], dict[str, torch.Tensor]]:
    """Every (loss, seed) run, and each loss's penultimate test features from its first seed."""
    losses = [make_loss(name, exp.smoothing) for name in exp.losses]
    pairs = [(loss, seed) for loss in losses for seed in exp.seeds]
    steps = training_steps(exp.settings, len(data.y_train))
    runs: list[RunResult] = []
    first_seed_features: dict[str, torch.Tensor] = {}
    for index, (loss, seed) in enumerate(pairs, start=1):
        label = f"[{index:>2}/{len(pairs)}] {loss.name:<13} seed {seed}"
        with tqdm(total=steps, desc=label, disable=not exp.progress, file=sys.stderr) as bar:
            result, features = run_one(data, loss, exp.settings, seed, exp.smoothing, exp.device, bar)
            outcome = f"test accuracy {100 * result.accuracy:.2f}%, {result.ms_per_step:.1f} ms/step"
            bar.set_postfix_str(outcome, refresh=False)  # closing the bar draws it once
        runs.append(result)
        first_seed_features.setdefault(loss.name, features)
    return runs, first_seed_features


def experiment_meta(exp: Experiment, data: Dataset, total_seconds: float, tsne_file: str) -> dict:
    """The machine and software the experiment ran on, with what it trained and how long it took."""
    return environment(
        exp.device.type,
        dataset=data.name,
        command=exp.command,
        model=MODELS[data.name].__name__,
        **asdict(exp.settings),
        smoothing=exp.smoothing,
        seeds=exp.seeds,
        losses=exp.losses,
        train_size=len(data.y_train),
        test_size=len(data.y_test),
        total_seconds=total_seconds,
        tsne_file=tsne_file,
    )


def run_experiment(exp: Experiment) -> dict[str, Path]:
    """Train every (loss, seed), then write the runs, the summary and the t-SNE figure."""
    began = time.perf_counter()
    data = load_dataset(exp.dataset, exp.data_dir, exp.max_train, exp.max_test)
    runs, first_seed_features = train_all(exp, data)
    exp.out.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    tsne_path = draw_tsne(
        data,
        first_seed_features,
        tsne_titles(runs, summary),
        exp.tsne_samples,
        output_path(exp.out, data.name, "tsne.png"),
    )
    meta = experiment_meta(exp, data, time.perf_counter() - began, tsne_path.name)
    return write_results(exp.out, runs, summary, meta, tsne_path)
