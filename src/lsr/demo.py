"""`python -m lsr.demo`: the losses side by side, and what the seed snippet's sign error does.

1. Every registered CPU implementation on one random batch, against its float64 definition.
2. One row of logits minimised by plain SGD under exact smoothing, equation 15 and the seed snippet:
   the first two settle at p_y = 1 - xi + xi/C; the snippet drives p_y to 1 and its loss below zero.
"""

from __future__ import annotations

import argparse

import torch

import lsr
from lsr.bench.report.tables import format_table


def minimise_one_row(loss_fn, num_classes: int, smoothing: float, steps: int = 3000, lr: float = 1.0):
    """SGD on a single row of float64 logits; returns (p_y, loss) at the end."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, num_classes, generator=gen, dtype=torch.float64).requires_grad_(True)
    target = torch.tensor([0])
    opt = torch.optim.SGD([z], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(z, target, smoothing)
        loss.backward()
        opt.step()
    return torch.softmax(z.detach(), dim=1)[0, 0].item(), loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.classes, generator=gen) * 3
    target = torch.randint(0, args.classes, (args.batch,), generator=gen)
    print(f"Random batch: N={args.batch}, C={args.classes}, smoothing={args.smoothing}, float32\n")
    lines = []
    for impl in lsr.available("cpu"):
        loss = impl.loss(logits, target, args.smoothing).item()
        ref = impl.reference(logits, target, args.smoothing).item()
        lines.append(
            [impl.name, impl.smoothing_kind, f"{loss:.6f}", f"{abs(loss - ref):.2e}", impl.description]
        )
    headers = ["implementation", "computes", "loss", "|loss - float64 def.|", "description"]
    print(format_table(headers, lines, align="llrrl"))

    C, xi = 10, 0.1
    print(
        f"\nOne row, C={C}, xi={xi}, 3000 SGD steps (lr 1.0): target p_y = 1 - xi + xi/C = {1 - xi + xi / C:.4f}"
    )
    for name, fn in [
        ("exact LSR", lsr.dense_label_smoothing),
        ("SparseLSR (eq. 15)", lsr.sparse_label_smoothing),
        ("seed snippet", lsr.seed_snippet_sparse_lsr),
    ]:
        p_y, loss = minimise_one_row(fn, C, xi)
        print(f"  {name:<20} p_y = {p_y:.6f}   loss = {loss:+.4f}")


if __name__ == "__main__":
    main()
