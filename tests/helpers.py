"""Shared test inputs."""

import torch


def random_problem(shape, scale=1.0, dtype=torch.float32, ignore_fraction=0.0, seed=0, ignore_index=-100):
    """Random normal logits (never zeros) of `shape` = (N, C, d1, ...) and random targets."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target_shape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
    target = torch.randint(0, shape[1] if len(shape) > 1 else shape[0], target_shape, generator=gen)
    if ignore_fraction:
        drop = torch.rand(target_shape, generator=gen) < ignore_fraction
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return logits, target
