"""Fixtures: registered implementations, the fused losses' CPU backends, poisoned allocations."""

import importlib.util
import os
import sys

import pytest
import torch

import lsr
from lsr.fused import cpu_options
from lsr.peers import NAMES as PEERS

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# Triton is imported (the nox tests session sets it too).
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETER = (
    importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
)

# The ways lsr.fused runs on CPU: chunked eager PyTorch, inductor-compiled, and the Triton kernels
# (interpreted; small blocks so that rows of a few dozen classes take the multi-block paths).
CPU_BACKENDS = ["eager", "compile", "triton"]


def cpu_implementations() -> list[lsr.Implementation]:
    """The project's own losses on CPU. The peers (lsr.peers) have their own tests, test_peers.py:
    they are other projects' code, held to the gate, not to every guarantee the project makes."""
    return [impl for impl in lsr.available("cpu") if impl.name not in PEERS]


@pytest.fixture(params=[impl.name for impl in cpu_implementations()])
def impl(request) -> lsr.Implementation:
    return lsr.get(request.param)


@pytest.fixture
def backend(request, monkeypatch):
    """Run the fused losses with `request.param` (parametrise indirectly over CPU_BACKENDS)."""
    name = request.param
    if name == "triton":
        if not TRITON_INTERPRETER:
            pytest.skip("the Triton backend needs Triton and TRITON_INTERPRET=1 before it is imported")
        from lsr.fused import triton_kernels

        monkeypatch.setattr(triton_kernels, "STATS_BLOCK", 16)
        monkeypatch.setattr(triton_kernels, "GRADIENT_BLOCK", 16)
    with cpu_options(name, eager_block_elements=8 if name == "eager" else None):
        yield name  # eager: several row blocks and a partial last one


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors for the test's duration,
    so agreement with a reference shows that every element of an output was written."""

    def poisoned(allocate):
        def wrapper(*args, **kwargs):
            out = allocate(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
