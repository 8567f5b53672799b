"""The one-pass CPU kernel against the floor: `python benchmarks/onepass_cpu.py`.

Per size (float32, smoothing 0.1, all threads), side by side in one run:
- the floor `torch.exp(z, out=buf)`: read S, write S, one exp per logit;
- `lsr.fused.cpu.forward_gradient` (the C++ kernel), exact and SparseLSR: loss and gradient over the logits
  in one call (the whole forward+backward of the one-pass mode, less its O(N) algebra);
- the two-pass kernels alone: `row_stats` (the forward's read) and `gradient` written over the
  logits (the in-place backward);
- the existing fused exact loss with `inplace_backward=True`, forward+backward (two passes).
Each call is timed alone with perf_counter; the logits it overwrites are restored from a copy
outside the timed region. Variants are interleaved over rounds (a shared machine drifts); figures
are medians of all calls, ratios medians of per-round ratios of medians.

`--cpu-time` times one thread's CPU time (time.thread_time, torch.set_num_threads(1)) instead: on a
machine shared with other work, wall-clock times measure the scheduler, while a thread's CPU time
(memory stalls included) still compares kernels with each other and with the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from lsr.bench.measure.machine import environment
from lsr.bench.report.tables import format_table
from lsr.fused import cpp, cpu, cpu_options, fused_label_smoothing

SMOOTHING = 0.1
FLOOR = "floor exp(z, out=buf)"


def variants(
    n_rows: int, n_cols: int, fallback: bool, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[Callable[[], None], Callable[[], object]]]:
    """name -> (restore, call): `restore` (untimed) puts fresh logits back, `call` is timed."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n_rows, n_cols, generator=gen) * 2).to(dtype)
    target = torch.randint(0, n_cols, (n_rows,), generator=gen)
    scale = torch.full((n_rows,), 1.0 / n_rows)  # the mean's upstream gradient
    work = torch.empty_like(logits)
    buf = torch.empty_like(logits)
    # A non-leaf, as a layer's output is (the in-place loss refuses leaves)
    leaf = logits.clone().requires_grad_(True)
    z_inplace = leaf.clone()

    def restore():
        work.copy_(logits)

    def restore_inplace():
        with torch.no_grad():
            z_inplace.copy_(logits)

    def onepass(sparse: bool, backend: str):
        def call():
            with cpu_options(backend):
                return cpu.forward_gradient(work, target, None, scale, SMOOTHING, sparse)

        return call

    # The two-pass kernels' per-row inputs: any finite values do the same work
    lse, _ = cpp.row_stats(logits, target, None, False)
    p, r, t = scale, scale * SMOOTHING / n_cols, -scale * (1 - SMOOTHING)

    def row_stats():
        return cpp.row_stats(work, target, None, False)

    def gradient_inplace():
        return cpp.gradient(work, target, None, lse, p, r, t, out=work)

    def fused_inplace():
        loss = fused_label_smoothing(z_inplace, target, SMOOTHING, "mean", inplace_backward=True)
        return torch.autograd.grad(loss, z_inplace)

    def floor():
        return torch.exp(work, out=buf)

    chosen = {
        FLOOR: (restore, floor),
        "onepass exact (C++)": (restore, onepass(False, "cpp")),
        "onepass sparse (C++)": (restore, onepass(True, "cpp")),
        "row_stats (C++)": (restore, row_stats),
        "gradient in place (C++)": (restore, gradient_inplace),
        "fused-exact inplace fwd+bwd": (restore_inplace, fused_inplace),
    }
    if fallback:
        chosen["onepass exact (PyTorch fallback)"] = (restore, onepass(False, "eager"))
    return chosen


def measure(
    n_rows: int,
    n_cols: int,
    rounds: int,
    calls: int,
    fallback: bool,
    markdown: bool = False,
    clock=time.perf_counter,
    dtype: torch.dtype = torch.float32,
) -> str:
    chosen = variants(n_rows, n_cols, fallback, dtype)
    by_round = _time_rounds(chosen, rounds, calls, clock)

    def ratio(name: str) -> float:
        return statistics.median(
            statistics.median(a) / statistics.median(b)
            for a, b in zip(by_round[name], by_round[FLOOR], strict=True)
        )

    rows = []
    for name, per_round in by_round.items():
        all_calls = sorted(t for times in per_round for t in times)
        q1, q3 = all_calls[len(all_calls) // 4], all_calls[(3 * len(all_calls)) // 4]
        median = statistics.median(all_calls)
        rows.append([name, f"{median * 1e3:.2f}", f"{(q3 - q1) / median:.0%}", f"{ratio(name):.2f}"])
    return format_table(
        ["variant", "median ms", "IQR/median", "x floor"], rows, align="lrrr", markdown=markdown
    )


def measure_scaling(
    n_rows: int, n_cols: int, rounds: int, calls: int, dtype: torch.dtype, markdown: bool
) -> str:
    """Each variant at 1 thread and at torch's count, interleaved in every round (the sweep's 1-thread
    and all-core rows are measured minutes apart): speedup, and parallel efficiency over the floor's."""
    threads = torch.get_num_threads()
    chosen = variants(n_rows, n_cols, False, dtype)
    by_threads: dict[int, dict[str, list[list[float]]]] = {1: {name: [] for name in chosen}, threads: {}}
    by_threads[threads] = {name: [] for name in chosen}
    try:
        for _ in range(rounds):
            for count in (1, threads):
                torch.set_num_threads(count)
                for name, per_round in _time_rounds(chosen, 1, calls, time.perf_counter).items():
                    by_threads[count][name] += per_round
    finally:
        torch.set_num_threads(threads)

    def speedup(name: str) -> float:
        pairs = zip(by_threads[1][name], by_threads[threads][name], strict=True)
        return statistics.median(statistics.median(a) / statistics.median(b) for a, b in pairs)

    rows = [
        [
            name,
            f"{speedup(name):.2f}",
            f"{speedup(name) / threads:.2f}",
            f"{speedup(name) / speedup(FLOOR):.2f}",
        ]
        for name in chosen
    ]
    headers = ["variant", f"1 -> {threads} threads", "efficiency", "x floor's"]
    return format_table(headers, rows, align="lrrr", markdown=markdown)


def _time_rounds(chosen, rounds: int, calls: int, clock) -> dict[str, list[list[float]]]:
    """{name: one list of `calls` times per round}, the variants interleaved within each round."""
    for restore, call in chosen.values():  # warm-up (allocator, compilation), never timed
        restore()
        call()
    by_round: dict[str, list[list[float]]] = {name: [] for name in chosen}
    for _ in range(rounds):
        for name, (restore, call) in chosen.items():
            times = []
            for _ in range(calls):
                restore()
                start = clock()
                call()
                times.append(clock() - start)
            by_round[name].append(times)
    return by_round


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096x1000,4096x10000,1024x32768", help="NxC,NxC,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per variant per round")
    parser.add_argument("--fallback", action="store_true", help="also time the plain-PyTorch fallback")
    parser.add_argument("--markdown", action="store_true", help="pipe tables")
    parser.add_argument("--cpu-time", action="store_true", help="one thread's CPU time, not wall-clock")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="speedup from 1 thread to all, interleaved, against the floor's",
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    env = environment("cpu")
    cpp.extension()  # build (or load) outside any timing
    print(
        f"{env['cpu_model']} (vector ISA {env['vector_isa']}; kernel built for {cpp.isa()}), "
        f"{torch.get_num_threads()} threads, torch {env['torch_version']}, "
        f"{'CPU time of one thread' if args.cpu_time else 'wall-clock'}, load average {os.getloadavg()[0]:.1f}"
    )
    for size in args.sizes.split(","):
        n_rows, n_cols = (int(v) for v in size.lower().split("x"))
        print(f"\n{n_rows} x {n_cols} {args.dtype}")
        if args.scaling:
            print(measure_scaling(n_rows, n_cols, args.rounds, args.calls, dtype, args.markdown))
        else:
            print(
                measure(n_rows, n_cols, args.rounds, args.calls, args.fallback, args.markdown, clock, dtype)
            )


if __name__ == "__main__":
    main()
