"""The CPU alternatives for the fused losses, side by side: `python benchmarks/fused_cpu_alternatives.py`.

Forward+backward (`torch.autograd.grad` of a fresh loss, mean reduction, smoothing 0.1, `--dtype`) of
each variant, against `torch.exp(z, out=buf)` (the floor: read S, write S, one exp per logit) and
`torch.exp(z)` (the same into a new tensor, as any out-of-place gradient is), all timed in one run
with the benchmark's own core (`lsr.bench.measure.time_pass`, all threads). Variants are
interleaved over several rounds, since a shared machine drifts; each figure is the median over
rounds, and ratios are medians of per-round ratios. Peak memory is the exact peak of tensor bytes
above the inputs (profiler allocation events). docs/fused.md records a run and what it decided.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lsr.bench.measure import Measurement, cpu_peak_bytes, time_pass
from lsr.bench.measure.machine import environment
from lsr.bench.report.tables import format_table
from lsr.fused import cpu_options, fused_label_smoothing, fused_sparse_label_smoothing
from lsr.sparse import sparse_label_smoothing

SMOOTHING = 0.1
FLOOR = "floor exp(z, out=buf)"
NATIVE = "native F.cross_entropy"
DEFAULT_BLOCK = 1 << 16  # logits per block of the chunked eager path (lsr.fused.cpu's default)


def native(x: torch.Tensor, y: torch.Tensor, smoothing: float, reduction: str) -> torch.Tensor:
    return F.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)


def variants(
    n_rows: int, n_cols: int, block_elements: int, dtype: torch.dtype
) -> dict[str, Callable[[], object]]:
    """Every variant as a call without arguments, over one set of random logits (never zeros)."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(n_rows, n_cols, generator=gen) * 2).to(dtype).requires_grad_(True)
    # A non-leaf, as a layer's output is (in-place losses refuse leaves); holds gradients after a call.
    z_inplace = z.detach().clone().requires_grad_(True).clone()
    t = torch.randint(0, n_cols, (n_rows,), generator=gen)
    buf = torch.empty_like(z)

    def fwd_bwd(loss_fn, x=z, backend=None, block=block_elements, **kwargs):
        def run():
            with cpu_options(backend, eager_block_elements=block):
                return torch.autograd.grad(loss_fn(x, t, SMOOTHING, "mean", **kwargs), x)

        return run

    def floor():
        with torch.no_grad():
            return torch.exp(z, out=buf)

    def floor_new_tensor():
        with torch.no_grad():
            return torch.exp(z)

    return {
        FLOOR: floor,
        "exp(z) (new tensor)": floor_new_tensor,
        NATIVE: fwd_bwd(native),
        "fused-exact cpp": fwd_bwd(fused_label_smoothing, backend="cpp"),
        "fused-exact cpp inplace": fwd_bwd(
            fused_label_smoothing, x=z_inplace, backend="cpp", inplace_backward=True
        ),
        "fused-exact cpp one-pass": fwd_bwd(
            fused_label_smoothing, x=z_inplace, backend="cpp", gradient_in_forward=True
        ),
        "fused-sparse cpp": fwd_bwd(fused_sparse_label_smoothing, backend="cpp"),
        "fused-exact compile": fwd_bwd(fused_label_smoothing, backend="compile"),
        "fused-exact compile inplace": fwd_bwd(
            fused_label_smoothing, x=z_inplace, backend="compile", inplace_backward=True
        ),
        "fused-exact eager chunked": fwd_bwd(fused_label_smoothing, backend="eager"),
        "fused-exact eager unchunked": fwd_bwd(fused_label_smoothing, backend="eager", block=1 << 62),
        "fused-sparse compile": fwd_bwd(fused_sparse_label_smoothing, backend="compile"),
        "sparse (eager, eq. 15)": fwd_bwd(sparse_label_smoothing),
    }


def measure(
    n_rows: int, n_cols: int, rounds: int, min_time: float, block_elements: int, skip, dtype: torch.dtype
) -> str:
    """One size: every variant timed `rounds` times, interleaved; a table of medians and ratios."""
    chosen = {
        k: v
        for k, v in variants(n_rows, n_cols, block_elements, dtype).items()
        if not any(s in k for s in skip)
    }
    first_call = {}
    for name, fn in chosen.items():  # compilation and warm-up, reported, never timed
        start = time.perf_counter()
        fn()
        first_call[name] = time.perf_counter() - start
    by_round: dict[str, list[Measurement]] = {name: [] for name in chosen}
    for _ in range(rounds):
        for name, fn in chosen.items():
            by_round[name].append(time_pass(fn, min_time=min_time))
    grad_bytes = n_rows * n_cols * dtype.itemsize

    def per_round_ratio(a: str, b: str) -> str:
        if a not in by_round or b not in by_round:
            return ""
        ratios = [x.median / y.median for x, y in zip(by_round[a], by_round[b], strict=True)]
        return f"{statistics.median(ratios):.2f}"

    rows = []
    for name, fn in chosen.items():
        peak = cpu_peak_bytes(fn)
        rows.append(
            [
                name,
                f"{statistics.median(m.median for m in by_round[name]) * 1e3:.2f}",
                f"{max(m.relative_iqr for m in by_round[name]):.0%}",
                per_round_ratio(name, FLOOR),
                per_round_ratio(NATIVE, name),
                f"{peak / grad_bytes:.3f}",
                f"{(peak - grad_bytes) / n_rows:.1f}",
                f"{first_call[name]:.1f}",
            ]
        )
    headers = ["variant", "median ms", "max IQR", "x floor", "native/x", "peak/grad", "B/row", "first call s"]
    return format_table(headers, rows, align="lrrrrrrr")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096x1024,512x8192,4096x10000", help="NxC,NxC,...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per sample set")
    parser.add_argument("--block-elements", type=int, default=DEFAULT_BLOCK, help="eager path's block size")
    parser.add_argument("--skip", default="", help="comma-separated substrings of variant names to skip")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    skip = tuple(s for s in args.skip.split(",") if s)
    env = environment("cpu")
    print(f"{env['cpu_model']} ({env['vector_isa']}), {env['threads']} threads, torch {env['torch_version']}")
    for size in args.sizes.split(","):
        n_rows, n_cols = (int(v) for v in size.lower().split("x"))
        print(f"\n{n_rows} x {n_cols} {args.dtype}")
        print(measure(n_rows, n_cols, args.rounds, args.min_time, args.block_elements, skip, dtype))


if __name__ == "__main__":
    main()
