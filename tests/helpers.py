"""What the tests share: random inputs, tolerances, the comparison against the float64 definitions,
and pytest run in a child process."""

import subprocess
import sys
from pathlib import Path

import torch

from lsr.types import REDUCTIONS  # noqa: F401 - re-exported for the tests' parametrisations

TOLERANCE = {  # (rtol, atol) against float64, by the computed dtype
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


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


def loss_and_grad(fn, logits, target, **kwargs):
    """Loss and d(sum(loss * u))/d(logits) for a fixed random u, so 'none' gets a non-trivial backward.

    Each call gets its own copy of the logits, passed as a layer's output (`x * 1`), not a leaf: the
    in-place and one-pass modes refuse leaves, and the one-pass mode overwrites what it is given.
    """
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x * 1, target, **kwargs)
    # Made on the CPU (one seed for every device), then moved to the loss's device.
    upstream = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    upstream = upstream.to(out.device)
    (out.double() * upstream).sum().backward()
    return out.detach(), x.grad


def plain_grad(fn, logits, target, **kwargs):
    """d(loss)/d(logits) for a scalar loss, as .backward() gives it."""
    x = logits.detach().clone().requires_grad_(True)
    fn(x, target, **kwargs).backward()
    return x.grad


def check(fn, ref, logits, target, rtol=None, atol=None, **kwargs):
    """`fn` agrees with the float64 `ref` in loss and gradient, with dtypes and shapes as expected."""
    default_rtol, default_atol = TOLERANCE[logits.dtype]
    rtol = default_rtol if rtol is None else rtol  # an explicit 0 stays 0
    atol = default_atol if atol is None else atol
    loss, grad = loss_and_grad(fn, logits, target, **kwargs)
    ref_loss, ref_grad = loss_and_grad(ref, logits.double(), target, **kwargs)
    assert loss.dtype == logits.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


ROOT = Path(__file__).resolve().parents[1]


def run_pytest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """pytest with `args` in a child process at the repository's root, output captured."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# --- what the benchmark's tests share ----------------------------------------------------------------

FAST = dict(min_time=0.001, progress=False)  # run_sweep's options for a quick sweep
EAGER = ["native", "dense", "sparse"]
PLAIN = ("float32", 0.1, 0.0, False)  # dtype, smoothing, ignore fraction, weighted of the plain sweep


def eager_grid():
    """A tiny grid of the eager implementations: N 8 and 32, C 10, float32, every pass."""
    from lsr.bench.sweep.grid import Grid

    return Grid(EAGER, ["cpu"], ["float32"], batches=[8, 32], classes=[10])


def wrong_smoothing(input, target, smoothing, reduction="mean", ignore_index=-100):
    """native with the smoothing off by 0.05: what the gate must reject."""
    import lsr

    return lsr.native_label_smoothing(input, target, min(1.0, smoothing + 0.05), reduction, ignore_index)


def small_sweep() -> list:
    """The floor (forward+backward), native and sparse (forward) at N 4, C 3: the smallest sweep."""
    from lsr.bench.data import FLOOR, Case

    def case(name: str, pass_: str = "forward") -> Case:
        return Case(name, "cpu", "float32", 4, 3, 0.1, pass_)

    return [case(FLOOR, "forward+backward"), case("native"), case("sparse")]
