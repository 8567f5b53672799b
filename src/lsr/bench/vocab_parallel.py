"""Per-rank time and peak memory of vocab-parallel label smoothing against world size.

Launched by torchrun, once per world size K; each run replaces its own rows of DIR/vocab_parallel.csv
and redraws the chart from every world size recorded there:

    for k in 1 2; do torchrun --nproc-per-node $k -m lsr.bench.vocab_parallel --out results/parallel; done

Every rank holds N x C/K logits (C split as evenly as it goes) and times forward+backward of
`lsr.parallel.vocab_parallel_label_smoothing` (exact and SparseLSR), with the same number of calls on
every rank (their collectives must pair up), started together after a barrier. Beside it, every rank
times the unsharded fused loss over the whole N x C at the same moment, so that both see the same
contention. CPU: gloo, `--threads` threads per rank (default 1); CUDA: NCCL, one GPU per rank
(LOCAL_RANK). Time: `lsr.bench.measure.time_pass`; peak memory: bytes allocated above the start
during one call (`lsr.bench.measure.peak_bytes`), per rank.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lsr.bench.cli.arguments import AT_LEAST_ONE, EXIT_USAGE, PROBABILITY, Parser, checked
from lsr.bench.data import SchemaError, atomic_write
from lsr.bench.measure import environment, peak_bytes, synchronize, time_pass
from lsr.bench.report import style
from lsr.fused import fused_label_smoothing, fused_sparse_label_smoothing
from lsr.parallel import vocab_parallel_label_smoothing
from lsr.types import DTYPES

CSV_NAME, METADATA_NAME, CHART_NAME = "vocab_parallel.csv", "metadata.json", "vocab_parallel.png"
FIELDS = (
    "world_size",
    "rank",
    "implementation",
    "loss",
    "batch",
    "classes",
    "local_classes",
    "dtype",
    "device",
    "threads",
    "median_s",
    "iqr_s",
    "samples",
    "peak_bytes",
)
VOCAB_PARALLEL, UNSHARDED = "vocab-parallel", "fused (unsharded)"
MIN_CALL_S = 2e-3  # time_pass blocks calls shorter than 1 ms: the ranks' block sizes could then differ


def _slice(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, size) of rank's share of num_classes, as even as it goes (the first ranks 1 more)."""
    base, extra = divmod(num_classes, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def _pass(loss_fn, logits, device):
    """Forward+backward; returns the gradient (kept alive: it counts in the peak)."""

    def run():
        (grad,) = torch.autograd.grad(loss_fn(logits), logits)
        synchronize(device)
        return grad

    return run


def _measure(run, device, samples: int) -> dict:
    """time_pass and peak_bytes with the same number of calls on every rank."""
    dist.barrier()
    start = time.perf_counter()
    run()  # warm-up (and compilation) outside the check below
    one_call = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(one_call, op=dist.ReduceOp.MIN)
    if one_call.item() < MIN_CALL_S:
        raise ValueError(
            f"calls of {one_call.item() * 1e3:.2f} ms are too short to time in step: raise --batch"
        )
    dist.barrier()
    measurement = time_pass(run, min_time=0.0, min_samples=samples, max_time=float("inf"))
    dist.barrier()
    peak = peak_bytes(run, device)
    return {
        "median_s": measurement.median,
        "iqr_s": measurement.iqr,
        "samples": len(measurement.samples),
        "peak_bytes": peak,
    }


def measure_rank(args, device) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    rows = []
    for num_classes in args.classes:
        target = torch.randint(0, num_classes, (args.batch,), generator=torch.Generator().manual_seed(0))
        target = target.to(device)
        offset, size = _slice(num_classes, world, rank)
        gen = torch.Generator().manual_seed(1 + rank)
        shard = (torch.randn(args.batch, size, generator=gen) * 2).to(device, dtype).requires_grad_(True)
        full = (
            (torch.randn(args.batch, num_classes, generator=gen) * 2).to(device, dtype).requires_grad_(True)
        )
        for loss, fused in (("exact", fused_label_smoothing), ("sparse", fused_sparse_label_smoothing)):
            sparse = loss == "sparse"
            cases = (
                (VOCAB_PARALLEL, shard, size, functools.partial(
                    vocab_parallel_label_smoothing,
                    target=target, smoothing=args.smoothing, sparse=sparse, class_offset=offset,
                )),
                (UNSHARDED, full, num_classes, functools.partial(fused, target=target, smoothing=args.smoothing)),
            )  # fmt: skip
            for implementation, logits, local_classes, loss_fn in cases:
                numbers = _measure(_pass(loss_fn, logits, device), device, args.samples)
                rows.append(
                    {
                        "world_size": world,
                        "rank": rank,
                        "implementation": implementation,
                        "loss": loss,
                        "batch": args.batch,
                        "classes": num_classes,
                        "local_classes": local_classes,
                        "dtype": args.dtype,
                        "device": device.type,
                        "threads": torch.get_num_threads(),
                        **numbers,
                    }
                )
                if rank == 0:
                    print(
                        f"K={world} {implementation:18} {loss:6} C={num_classes:6}: "
                        f"{numbers['median_s'] * 1e3:8.1f} ms, peak {numbers['peak_bytes'] / 2**20:7.1f} MiB",
                        flush=True,
                    )
        del shard, full
    return rows


# --- files and chart (rank 0) ----------------------------------------------------------------------------


# The numeric columns, and the least each may be: a cut-off or hand-edited row is refused, not drawn
NUMBERS = {
    "world_size": 1,
    "rank": 0,
    "batch": 1,
    "classes": 1,
    "local_classes": 0,
    "threads": 1,
    "median_s": 0,
    "iqr_s": 0,
    "samples": 1,
    "peak_bytes": 0,
}


def _read_rows(path: Path) -> list[dict]:
    """The file's rows, each checked: every column present, numbers that parse, a median above 0 and
    nothing below its least (SchemaError naming the file, line and column)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if list(reader.fieldnames or []) != list(FIELDS):
            raise SchemaError(f"{path}: not a vocab-parallel results file (columns {reader.fieldnames})")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        for column, least in NUMBERS.items():
            raw = row.get(column)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise SchemaError(
                    f"{path}:{line}: column {column!r} should be a number, got {raw!r}"
                ) from None
            if not math.isfinite(value) or value < least or (column == "median_s" and value == 0):
                raise SchemaError(f"{path}:{line}: column {column!r} is out of range: {raw}")
    return rows


def write_results(out: Path, rows: list[dict], metadata: dict) -> None:
    """Replace this world size's rows and metadata; keep the other world sizes'."""
    out.mkdir(parents=True, exist_ok=True)
    world = str(rows[0]["world_size"])
    kept = [row for row in _read_rows(out / CSV_NAME) if row["world_size"] != world]
    merged = sorted(
        kept + [{k: str(v) for k, v in row.items()} for row in rows],
        key=lambda r: (
            int(r["classes"]),
            r["loss"],
            r["implementation"],
            int(r["world_size"]),
            int(r["rank"]),
        ),
    )
    # Both files through a temporary file and a rename: a full disk or a kill leaves the old ones whole
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged)
    atomic_write(out / CSV_NAME, text.getvalue())
    metadata_path = out / METADATA_NAME
    by_world = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
    by_world[world] = metadata
    atomic_write(metadata_path, json.dumps(by_world, indent=2, sort_keys=True) + "\n")


def plot(out: Path) -> Path:
    """Per-rank time (the slowest rank's: it sets the step) and peak memory against world size, a
    column per class count; the unsharded fused loss dashed, and its time / K (perfect scaling)
    dotted grey."""
    rows = _read_rows(out / CSV_NAME)
    metadata = json.loads((out / METADATA_NAME).read_text())
    classes = sorted({int(r["classes"]) for r in rows})
    worlds = sorted({int(r["world_size"]) for r in rows})

    def slowest(c, implementation, loss, field):
        values = []
        for k in worlds:
            ranks = [
                float(r[field])
                for r in rows
                if (int(r["classes"]), r["implementation"], r["loss"], int(r["world_size"]))
                == (c, implementation, loss, k)
            ]
            values.append(max(ranks) if ranks else float("nan"))
        return values

    first = metadata[str(worlds[0])]
    loads = ", ".join(
        f"K={k}: {metadata[str(k)].get('load_average_1min') or 0:.1f} to {metadata[str(k)].get('load_average_1min_end') or 0:.1f}"
        for k in worlds
    )
    with style.context():
        fig = style.figure(4.2 * len(classes), 6.6)
        axes = fig.subplots(2, len(classes), squeeze=False, sharex=True)
        for col, c in enumerate(classes):
            time_ax, memory_ax = axes[0][col], axes[1][col]
            batch = next(int(r["batch"]) for r in rows if int(r["classes"]) == c)
            time_ax.set_title(f"N = {batch}, C = {c}")
            for loss in ("exact", "sparse"):
                # Colour: the loss (the fused losses' colours); solid: sharded, dashed: unsharded
                for implementation in (VOCAB_PARALLEL, UNSHARDED):
                    line = style.line_style(f"fused-{loss}")
                    if implementation == VOCAB_PARALLEL:
                        line |= {"marker": "o", "label": f"{VOCAB_PARALLEL}-{loss}, per rank"}
                    else:
                        line |= {"linestyle": "--", "label": f"fused-{loss}, unsharded, on each rank"}
                    times = [t * 1e3 for t in slowest(c, implementation, loss, "median_s")]
                    time_ax.plot(worlds, times, **line)
                    peaks = [b / 2**20 for b in slowest(c, implementation, loss, "peak_bytes")]
                    memory_ax.plot(worlds, peaks, **line)
            unsharded = slowest(c, UNSHARDED, "exact", "median_s")
            # Perfect scaling: the unsharded loss timed in the same run (same contention), over K
            ideal = [t * 1e3 / k for t, k in zip(unsharded, worlds, strict=True)]
            time_ax.plot(worlds, ideal, **style.REFERENCE, label="fused-exact, unsharded, / K")
            time_ax.set_ylim(bottom=0)
            memory_ax.set_ylim(bottom=0)
            memory_ax.set_xlabel("world size K (ranks)")
            memory_ax.set_xticks(worlds)
            if col == 0:
                time_ax.set_ylabel("forward+backward per rank, ms\n(slowest rank)")
                memory_ax.set_ylabel("peak allocated per rank, MiB")
            for ax in (time_ax, memory_ax):
                ax.grid(True)
        backend = "NCCL" if first["device"].startswith("cuda") else "gloo"
        what = f"vocab-parallel label smoothing vs world size K ({backend}, {first['device']})"
        fig.suptitle(
            style.title(what, first, first.get("dtype")) + f"\n1-minute load average, start to end: {loads}"
        )
        style.legend_below(fig, columns=3)
        return style.save(fig, out / CHART_NAME)


# --- entry point -------------------------------------------------------------------------------------------


class _RankParser(Parser):
    """The CLI's one-line refusals (exit 2), said by rank 0 only: every rank refuses the same
    arguments, before any collective, and one line is enough."""

    def error(self, message: str):
        if int(os.environ.get("RANK", 0)) != 0:
            self.exit(EXIT_USAGE)
        super().error(message)


AT_LEAST_THREE = checked(int, lambda v: v >= 3, "must be at least 3 (a median and an IQR)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _RankParser(
        prog="torchrun --nproc-per-node K -m lsr.bench.vocab_parallel",
        description="Per-rank time and peak memory of lsr.parallel's vocab-parallel loss at world size K.",
    )
    parser.add_argument("--out", type=Path, default=Path("results/parallel"), help="results directory")
    parser.add_argument("--batch", type=AT_LEAST_ONE, default=4096, help="rows N (default 4096)")
    parser.add_argument(
        "--classes",
        type=AT_LEAST_ONE,
        nargs="+",
        default=[8192, 32768],
        help="total classes C, at least 2 (SparseLSR) and at least the world size (default 8192 32768)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--smoothing", type=PROBABILITY, default=0.1, help="in [0, 1] (default 0.1)")
    parser.add_argument("--samples", type=AT_LEAST_THREE, default=7, help="timed calls per case (default 7)")
    parser.add_argument("--threads", type=AT_LEAST_ONE, default=1, help="CPU threads per rank (default 1)")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    too_few = [c for c in args.classes if c < max(2, world)]
    if too_few:
        parser.error(f"--classes {too_few[0]}: each needs at least 2 and at least the world size {world}")
    return args


def _require_rank_zeros_settings(args: argparse.Namespace) -> None:
    """Rank 0's settings are the run's: ranks launched with other arguments (each rank parses its
    own command line) are refused on every rank, naming the setting, before anything is measured."""
    mine = {k: str(v) for k, v in sorted(vars(args).items())}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for key in mine:
        values = {rank: settings[key] for rank, settings in enumerate(everyone)}
        if len(set(values.values())) > 1:
            said = ", ".join(f"rank {rank} {value}" for rank, value in values.items())
            if dist.get_rank() == 0:
                print(f"vocab_parallel: the ranks were given different --{key.replace('_', '-')}: {said}")
            dist.destroy_process_group()
            raise SystemExit(EXIT_USAGE)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --nproc-per-node K -m lsr.bench.vocab_parallel ...")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo")
    _require_rank_zeros_settings(args)
    try:
        metadata = (
            environment(device.type, dtype=args.dtype, world_size=dist.get_world_size())
            if dist.get_rank() == 0
            else {}
        )
        rows = measure_rank(args, device)
        metadata["load_average_1min_end"] = os.getloadavg()[0]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() == 0:
            write_results(args.out, [row for part in gathered for row in part], metadata)
            print(f"wrote {args.out / CSV_NAME} and {plot(args.out)}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
