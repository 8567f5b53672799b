"""Fixtures: registered implementations, the fused losses' CPU backends, poisoned allocations."""

import dataclasses
import importlib.util
import os
import signal
import sys

import pytest
import torch

import lsr
from lsr.fused import cpp, cpu_options

# The Ctrl-C tests send SIGINT to real processes. A shell that starts the suite in the background
# ignores SIGINT, and the ignore is inherited across exec: restore Python's handler, so that this
# process and the ones it starts see Ctrl-C as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# Triton is imported (the nox tests session sets it too). Not where CUDA is present: there the
# kernels run compiled, and the interpreter would take their CUDA launches too.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETER = (
    importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
)

# The ways lsr.fused runs on CPU: the C++ kernels, chunked eager PyTorch, inductor-compiled, and the
# Triton kernels (interpreted; small blocks so that rows of a few dozen classes take the multi-block paths).
CPU_BACKENDS = ["cpp", "eager", "compile", "triton"]

# The devices the loss tests run on: the CPU always, CUDA where present. On CUDA the fused losses run
# their compiled Triton kernels, so run there with TRITON_INTERPRET=0 (benchmarks/gpu/run.sh does):
# with the interpreter on, they would be interpreted again (tests/test_cuda.py fails then).
TEST_DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=TEST_DEVICES)
def device(request) -> str:
    """Each device in TEST_DEVICES; a test moves its inputs there."""
    return request.param


def cpu_implementations() -> list[lsr.Implementation]:
    """The project's own losses on CPU. The peers (lsr.peers) have their own tests, test_peers.py:
    they are other projects' code, held to the gate, not to every guarantee the project makes."""
    return [impl for impl in lsr.available("cpu") if not impl.peer]


@pytest.fixture(params=[impl.name for impl in cpu_implementations()])
def impl(request) -> lsr.Implementation:
    """A registered implementation. A one-pass one (gradient_in_forward) gets each call's logits as a
    layer's output (`input * 1`): it refuses leaves, and it overwrites what it is given, so the
    caller's tensor, from which the tests take their references, stays as it was."""
    impl = lsr.get(request.param)
    if not impl.gradient_in_forward:
        return impl
    loss = impl.loss
    return dataclasses.replace(impl, loss=lambda input, *args, **kwargs: loss(input * 1, *args, **kwargs))


@pytest.fixture
def backend(request, monkeypatch):
    """Run the fused losses with `request.param` (parametrise indirectly over CPU_BACKENDS)."""
    name = request.param
    if name == "cpp" and cpp.build_problem() is not None:
        pytest.skip(f"the C++ kernels cannot be built here: {cpp.build_problem()}")
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
