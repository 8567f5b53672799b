"""The LM head with label smoothing on CPU, side by side in one run: time and peak memory of
forward+backward for `lsr.linear_label_smoothing` (exact and SparseLSR), the materialised
`F.cross_entropy(F.linear(...))`, torch's `F.linear_cross_entropy` (with chunking options: at
smoothing > 0 it warns and materialises), the three GEMMs alone (logits, d_hidden, d_weight) and
`torch.exp(z, out=buf)` over an N x V tensor (the loss pass's floor).

    python benchmarks/lm_head.py                       # N 2048, H 512, V 32000, float32 and bfloat16
    python benchmarks/lm_head.py --batch 8192 --hidden 256 --dtype float32 --markdown

Peak: bytes allocated above the inputs during one forward+backward (`lsr.bench.measure.cpu_peak_bytes`),
the gradients included. Time: medians of `lsr.bench.measure.time_pass` at torch's thread count.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

import lsr
from lsr.bench.measure import cpu_peak_bytes, environment, time_pass
from lsr.bench.report.tables import format_table
from lsr.types import DTYPES


def cases(h, w, y, smoothing):
    """name -> a forward+backward callable (gradients handed back, never accumulated)."""

    def backward_of(loss_fn):
        def step():
            loss = loss_fn()
            return torch.autograd.grad(loss, (h, w))

        return step

    torch_options = torch.nn.LinearCrossEntropyOptions()

    def gemms():  # logits, d_hidden, d_weight at the same shapes: the work any head loss must do
        with torch.no_grad():
            z = h @ w.t()
            return z @ w, z.t() @ h

    z_buf = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype)
    z_src = torch.randn(h.shape[0], w.shape[0]).to(h.dtype)

    def floor():
        with torch.no_grad():
            return torch.exp(z_src, out=z_buf)

    return {
        "lsr exact": backward_of(lambda: lsr.linear_label_smoothing(h, w, y, smoothing)),
        "lsr sparse": backward_of(lambda: lsr.linear_label_smoothing(h, w, y, smoothing, sparse=True)),
        "materialised F.cross_entropy(F.linear)": backward_of(
            lambda: F.cross_entropy(F.linear(h, w), y, label_smoothing=smoothing)
        ),
        "torch F.linear_cross_entropy (chunked options)": backward_of(
            lambda: F.linear_cross_entropy(h, w, y, label_smoothing=smoothing, options=torch_options)
        ),
        "three GEMMs alone": gemms,
        "floor exp(z, out=buf) over N x V": floor,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    env = environment("cpu")
    print(f"{env['cpu_model']} ({env['vector_isa']}), {env['threads']} threads, torch {env['torch_version']}")
    warnings.simplefilter("ignore")  # torch's linear_cross_entropy warns that it ignores its options
    for dtype in args.dtype:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(args.batch, args.hidden, generator=gen).to(DTYPES[dtype]).requires_grad_()
        w = (torch.randn(args.classes, args.hidden, generator=gen) / args.hidden**0.5).to(DTYPES[dtype])
        w.requires_grad_()
        y = torch.randint(0, args.classes, (args.batch,), generator=gen)
        lines = []
        measured = {}
        for name, step in cases(h, w, y, args.smoothing).items():
            timing = time_pass(step, min_time=args.min_time, min_samples=5)
            peak = cpu_peak_bytes(step)
            measured[name] = timing.median
            lines.append(
                [name, f"{timing.median * 1e3:.1f}", f"{timing.iqr * 1e3:.1f}", f"{peak / 2**20:.1f}"]
            )
        beyond = {n: measured[n] - measured["three GEMMs alone"] for n in ("lsr exact", "lsr sparse")}
        floor = measured["floor exp(z, out=buf) over N x V"]
        print(f"\n{dtype}, N {args.batch}, H {args.hidden}, V {args.classes}, smoothing {args.smoothing}")
        print(
            format_table(
                ["fwd+bwd", "median ms", "IQR ms", "peak MiB"], lines, markdown=args.markdown, align="lrrr"
            )
        )
        for name, extra in beyond.items():
            print(
                f"{name}: time beyond the three GEMMs {extra * 1e3:.1f} ms = {extra / floor:.2f} x the floor"
            )


if __name__ == "__main__":
    main()
