"""The LM head losses' sweeps (`lsr.heads`): `HeadGrid` and the head presets, which `grid.PRESETS`
holds beside the logits losses' (registered when `lsr.bench.sweep` is imported)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import lsr.heads
from lsr.bench.data import FLOOR_GEMM, FWD_BWD, Case, Pass
from lsr.bench.sweep.grid import ALL_CORES, PRESETS, thread_count


@dataclass(frozen=True)
class HeadGrid:
    """A sweep of LM head losses (`lsr.heads`): tokens x hidden x vocabulary x dtype x smoothing x
    pass, and the floor-gemm case (the three GEMMs alone) per (device, dtype, tokens, hidden,
    vocabulary, threads). Every implementation named gets a row in every case, measured or with the
    status and reason it was not (a peer with no smoothing, one that does not run on the device here),
    so that the results say why a peer is missing. A case's batch is its tokens, its classes the
    vocabulary, its hidden H."""

    implementations: Sequence[str]
    devices: Sequence[str]
    dtypes: Sequence[str]
    tokens: Sequence[int]
    hidden: Sequence[int]
    vocab: Sequence[int]
    smoothings: Sequence[float] = (0.0, 0.1)
    passes: Sequence[Pass] = (FWD_BWD,)
    threads: Sequence[int | str] = (ALL_CORES,)

    def cases(self) -> Iterator[Case]:
        thread_counts = dict.fromkeys(map(thread_count, self.threads))
        for device, dtype, tokens, hidden, vocab, threads in itertools.product(
            self.devices, self.dtypes, self.tokens, self.hidden, self.vocab, thread_counts
        ):
            size = {"threads": threads, "hidden": hidden}
            yield Case(FLOOR_GEMM, device, dtype, tokens, vocab, self.smoothings[0], FWD_BWD, **size)
            for name, smoothing, pass_ in itertools.product(
                self.implementations, self.smoothings, self.passes
            ):
                yield Case(name, device, dtype, tokens, vocab, smoothing, pass_, **size)

    def as_dict(self) -> dict[str, list]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def head_registered() -> list[str]:
    return list(lsr.heads.HEAD_REGISTRY)


# The LM head presets (`lsr-bench run --preset head`): every head loss, smoothing 0 and 0.1
# (torch's chunked path and Cut Cross-Entropy exist at 0 only), forward+backward, plus forward and
# backward apart at one size. CPU, 146 cases in 29 minutes on the idle 2-core Xeon AVX-512 of
# results/head (measured, 2026-12-07; a float32 N 8192 case about 25 s): the part-1 shape's
# vocabulary (32000) at H 256, tokens 512 to 8192 float32 (the peak-vs-tokens axis), bfloat16 to
# 2048 (its GEMMs run 4x slower here), and H 1024 at 2048 tokens. CUDA: an LLM's head, bfloat16,
# H 4096, the vocabularies of Llama 2, Llama 3, Qwen2 and Gemma 3; NOT MEASURED (no GPU was lent
# to the session that wrote it), its duration unknown (benchmarks/gpu/run.sh gives it 90 s and
# `--resume` finishes it): cases whose estimated peak exceeds the GPU are recorded skipped.
HEAD_VOCAB = 32000
HEAD_LLM_VOCABS = (32000, 128256, 151936, 262144)
HEAD_PRESETS: dict[str, dict[str, tuple[HeadGrid, ...]]] = {
    "head": {
        "cpu": (
            HeadGrid(head_registered(), ["cpu"], ["float32"], [512, 2048, 8192], [256], [HEAD_VOCAB]),
            HeadGrid(head_registered(), ["cpu"], ["float32"], [2048], [1024], [HEAD_VOCAB]),
            HeadGrid(head_registered(), ["cpu"], ["bfloat16"], [512, 2048], [256], [HEAD_VOCAB]),
            HeadGrid(
                head_registered(),
                ["cpu"],
                ["float32"],
                [2048],
                [256],
                [HEAD_VOCAB],
                smoothings=(0.1,),
                passes=("forward", "backward"),
            ),
        ),
        "cuda": (
            HeadGrid(head_registered(), ["cuda"], ["bfloat16"], [4096, 16384], [4096], HEAD_LLM_VOCABS),
            HeadGrid(head_registered(), ["cuda"], ["bfloat16"], [65536], [4096], [128256]),
        ),
    },
    # The head run's plumbing on CPU (benchmarks/gpu/run.sh --dry-run): the CUDA preset's shape, tiny.
    "head-dry-run": {
        "cpu": (HeadGrid(head_registered(), ["cpu"], ["bfloat16", "float32"], [64, 256], [64], [320, 1001]),),
    },
}
PRESETS.update(HEAD_PRESETS)
