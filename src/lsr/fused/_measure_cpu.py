"""Measure the CPU alternatives for the fused losses side by side: `python -m lsr.fused._measure_cpu`.

Forward+backward (`torch.autograd.grad` of a fresh loss, mean reduction, smoothing 0.1, fp32) for
each variant, against `torch.exp(z, out=buf)` (the floor: read S, write S, one exp per logit) and
`torch.exp(z)` (the same into a new tensor, as any out-of-place gradient is) timed in the same run.
`torch.utils.benchmark.Timer` with all threads; variants are interleaved over several rounds, since a
shared machine drifts, and each figure is the median over rounds of the per-round medians. Peak
memory is the exact peak of tensor bytes above the inputs (profiler allocation events, running sum).
docs/fused.md records a run and what was chosen from it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from lsr.fused import cpu, fused_label_smoothing, fused_sparse_label_smoothing
from lsr.sparse import sparse_label_smoothing

SMOOTHING = 0.1


def _variants(z: torch.Tensor, z_inplace: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> dict:
    def fwd_bwd(loss_fn, x=z, backend=None, block=None, **kwargs):
        def run():
            previous = cpu.set_cpu_backend(backend) if backend else None
            saved_block = cpu.EAGER_BLOCK_ELEMENTS
            if block:
                cpu.EAGER_BLOCK_ELEMENTS = block
            try:
                return torch.autograd.grad(loss_fn(x, t, SMOOTHING, "mean", **kwargs), x)
            finally:
                cpu.EAGER_BLOCK_ELEMENTS = saved_block
                if previous:
                    cpu.set_cpu_backend(previous)

        return run

    def floor():
        with torch.no_grad():
            return torch.exp(z, out=buf)

    def floor_alloc():
        with torch.no_grad():
            return torch.exp(z)

    def native(x, y, smoothing, reduction):
        return F.cross_entropy(x, y, label_smoothing=smoothing, reduction=reduction)

    return {
        "floor exp(z, out=buf)": floor,
        "exp(z) (new tensor)": floor_alloc,
        "native F.cross_entropy": fwd_bwd(native),
        "fused-exact compile": fwd_bwd(fused_label_smoothing, backend="compile"),
        "fused-exact compile inplace": fwd_bwd(
            fused_label_smoothing, x=z_inplace, backend="compile", inplace_backward=True
        ),
        "fused-exact eager chunked": fwd_bwd(fused_label_smoothing, backend="eager"),
        "fused-exact eager unchunked": fwd_bwd(fused_label_smoothing, backend="eager", block=1 << 62),
        "fused-sparse compile": fwd_bwd(fused_sparse_label_smoothing, backend="compile"),
        "sparse (eager, eq. 15)": fwd_bwd(sparse_label_smoothing),
    }


def measure(n_rows: int, n_cols: int, rounds: int, min_run_time: float, skip: tuple[str, ...]) -> None:
    from lsr.bench.measure import cpu_peak_bytes

    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(n_rows, n_cols, generator=gen) * 2).requires_grad_(True)
    z_inplace = z.detach().clone().requires_grad_(True)  # holds gradients after the first call
    t = torch.randint(0, n_cols, (n_rows,), generator=gen)
    buf = torch.empty_like(z)
    variants = {k: v for k, v in _variants(z, z_inplace, t, buf).items() if not any(s in k for s in skip)}
    threads = torch.get_num_threads()
    print(f"\n{n_rows} x {n_cols} float32, {threads} threads, torch {torch.__version__}")
    first_call = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        fn()
        first_call[name] = time.perf_counter() - start
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    floor = [times["floor exp(z, out=buf)"][i] for i in range(rounds)]
    native = times.get("native F.cross_entropy")
    grad_bytes = z.numel() * z.element_size()
    print(
        f"{'variant':30s} {'median ms':>10s} {'x floor':>8s} {'native/x':>9s} {'peak/grad':>10s} {'B/row':>8s}"
    )
    for name, fn in variants.items():
        ms = statistics.median(times[name]) * 1e3
        ratio = statistics.median(times[name][i] / floor[i] for i in range(rounds))
        speedup = (
            statistics.median(native[i] / times[name][i] for i in range(rounds)) if native else float("nan")
        )
        peak = cpu_peak_bytes(fn)
        per_row = (peak - grad_bytes) / n_rows
        print(
            f"{name:30s} {ms:10.2f} {ratio:8.2f} {speedup:9.2f} {peak / grad_bytes:10.3f} {per_row:8.1f}"
            f"   (first call {first_call[name]:.1f} s)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096x1024,512x8192,4096x10000", help="NxC,NxC,...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per Timer sample block")
    parser.add_argument("--skip", default="", help="comma-separated substrings of variant names to skip")
    args = parser.parse_args(argv)
    skip = tuple(s for s in args.skip.split(",") if s)
    for size in args.sizes.split(","):
        n_rows, n_cols = (int(v) for v in size.lower().split("x"))
        measure(n_rows, n_cols, args.rounds, args.min_run_time, skip)


if __name__ == "__main__":
    main()
