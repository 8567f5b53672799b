"""The peers (lsr.peers): each adapter against the float64 reference where it runs here, every capability
flag it declares, the differences from PyTorch its notes state, and a peer not installed reported as not
available, never as an error.

native-compiled compiles a graph per dtype, reduction, weighting, layout and smoothing value, seconds each
on a slow CPU: its tests compile two, and vary the sizes within them (which must not recompile). liger is registered for CUDA
only; here its Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1, conftest.py),
called through the adapter directly.
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lsr
from conftest import TRITON_INTERPRETER
from helpers import TOLERANCE, check, loss_and_grad, plain_grad, random_problem
from lsr import peers
from lsr.reference import exact_reference
from lsr.types import DTYPES

ROOT = Path(__file__).resolve().parents[1]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# --- the registry entries ---------------------------------------------------------------------------


def test_peers_are_registered_with_their_devices_and_flags():
    assert all(impl.peer and impl.name in lsr.REGISTRY for impl in peers.implementations())
    compiled, liger = lsr.get("native-compiled"), lsr.get("liger")
    assert compiled.devices == ("cpu", "cuda") and liger.devices == ("cuda",)
    assert compiled.smoothing_kind == liger.smoothing_kind == "exact"
    assert not compiled.inplace_backward and liger.inplace_backward
    assert set(compiled.dtypes) == set(DTYPES) and set(liger.dtypes) == {"float32", "float16", "bfloat16"}
    assert compiled.supports_weight and liger.supports_weight
    assert compiled.supports_ignore_index and liger.supports_ignore_index
    assert liger.notes and "overwrites the logits" in liger.notes
    # What the benchmark asks (Implementation.unsupported): a sentence for what a peer does not take
    assert (
        liger.unsupported(classes=10, dtype="float64")
        == "liger takes float32, float16, bfloat16 logits, not float64"
    )
    for impl in (compiled, liger):
        for reduction in ("mean", "sum", "none"):
            assert impl.unsupported(classes=1, reduction=reduction, weighted=True, ignoring=True) is None


def test_availability_is_checked_without_importing_liger_or_triton(monkeypatch):
    for name in list(sys.modules):  # as in a process that has not imported them (restored afterwards)
        if name.partition(".")[0] in ("liger_kernel", "triton"):
            monkeypatch.delitem(sys.modules, name)
    for device in ("cpu", "cuda"):
        lsr.available(device)
    assert not {name.partition(".")[0] for name in sys.modules} & {"liger_kernel", "triton"}


# --- a peer not installed ---------------------------------------------------------------------------


def test_liger_not_installed_is_not_available(monkeypatch):
    # A None entry in sys.modules makes `import liger_kernel` fail and find_spec find nothing, as on a
    # machine without it.
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    assert not peers.liger_installed()
    assert not lsr.get("liger").runs_on("cuda")
    assert "liger" not in [impl.name for impl in lsr.available("cuda")]
    assert lsr.get("native-compiled").runs_on("cuda") == (
        peers.importlib.util.find_spec("triton") is not None
    )


def test_without_triton_neither_peer_runs_on_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert not lsr.get("liger").runs_on("cuda") and not lsr.get("native-compiled").runs_on("cuda")
    assert lsr.get("native-compiled").runs_on("cpu") == peers.cxx_compiler_available()


def test_native_compiled_on_cpu_needs_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(peers, "cxx_compiler_available", lambda: False)
    assert not lsr.get("native-compiled").runs_on("cpu")
    assert "native-compiled" not in [impl.name for impl in lsr.available("cpu")]


def test_a_process_without_liger_and_triton_imports_lsr_and_reports_them_not_available(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        'import sys\nsys.modules["liger_kernel"] = None\nsys.modules["triton"] = None\n'
    )
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    check = (
        "import lsr\n"
        "print([i.name for i in lsr.available('cuda') if i.name in ('liger', 'native-compiled')])\n"
        "try:\n"
        "    lsr.peers.liger_label_smoothing(lsr.peers.torch.zeros(2, 3), lsr.peers.torch.tensor([0, 1]))\n"
        "except ImportError:\n"
        "    print('ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.stdout == "[]\nImportError\n", result.stderr[-2000:]


# --- native-compiled: torch.compile of F.cross_entropy, on CPU --------------------------------------

needs_compiler = pytest.mark.skipif(
    not lsr.get("native-compiled").runs_on("cpu"), reason="torch.compile on CPU needs a C++ compiler"
)


WEIGHT = torch.rand(33, generator=torch.Generator().manual_seed(3)) + 0.5


@needs_compiler
def test_native_compiled_mean_with_weights_and_ignored_targets():
    """float32, mean, class weights, ignored targets: one graph for every batch size (dynamic=True).
    With weights the class count is specialised (F.cross_entropy's C++ label smoothing reads the
    weight's size), so only the batch varies here."""
    fn = peers.native_compiled_label_smoothing
    logits, target = random_problem((8, 33), ignore_fraction=0.3, seed=1)
    check(fn, exact_reference, logits, target, smoothing=0.1, reduction="mean", weight=WEIGHT)
    before = graphs_compiled()
    for seed, batch in enumerate([5, 64]):
        logits, target = random_problem((batch, 33), ignore_fraction=0.3, seed=seed + 2)
        check(fn, exact_reference, logits, target, smoothing=0.1, reduction="mean", weight=WEIGHT)
    assert graphs_compiled() == before


@needs_compiler
def test_native_compiled_none_in_bfloat16_for_any_size():
    """bfloat16, reduction none, ignored targets: one graph for every N and C.

    With the graph above, the two reductions the benchmark runs (none and mean in its gate, mean timed),
    weights, ignored targets and its two dtypes. Each other dtype, reduction or layout would be another
    compilation (seconds on a slow CPU): sum, float16, float64, (C,) and (N, C, d1) logits are left to
    the benchmark's gate and PyTorch's own tests of F.cross_entropy, which this is, compiled.
    """
    fn = peers.native_compiled_label_smoothing
    logits, target = random_problem((6, 9), dtype=torch.bfloat16, ignore_fraction=0.3, seed=4)
    check(fn, exact_reference, logits, target, smoothing=0.2, reduction="none")
    before = graphs_compiled()
    logits, target = random_problem((13, 40), dtype=torch.bfloat16, ignore_fraction=0.3, seed=5)
    check(fn, exact_reference, logits, target, smoothing=0.2, reduction="none")
    assert graphs_compiled() == before


def test_native_compiled_checks_arguments_as_native_before_compiling():
    logits, target = random_problem((4, 5), seed=5)
    before = graphs_compiled()
    for bad in [
        dict(target=target + 5),
        dict(smoothing=1.5),
        dict(reduction="max"),
        dict(weight=torch.ones(4)),
    ]:
        args = dict(input=logits, target=target, smoothing=0.1, reduction="mean") | bad
        with pytest.raises((ValueError, TypeError)) as compiled_error:
            peers.native_compiled_label_smoothing(**args)
        with pytest.raises(type(compiled_error.value)) as native_error:
            lsr.native_label_smoothing(**args)
        assert str(compiled_error.value) == str(native_error.value)
    assert graphs_compiled() == before


@needs_compiler
def test_native_compiled_backward_refuses_retain_graph():
    """Its notes: torch.compile's donated buffers refuse retain_graph=True, so the benchmark cannot time a
    backward-only pass of it (one graph, backward again and again), and gradcheck cannot run."""
    logits, target = random_problem((8, 33), ignore_fraction=0.3, seed=1)
    x = logits.clone().requires_grad_(True)  # the graph of the first test: nothing new to compile
    loss = peers.native_compiled_label_smoothing(x, target, 0.1, "mean", weight=WEIGHT)
    with pytest.raises(RuntimeError, match="donated buffers"):
        torch.autograd.grad(loss, x, retain_graph=True)


# --- liger: Liger-Kernel's Triton cross-entropy, under the Triton interpreter on CPU -----------------


@pytest.fixture
def liger(monkeypatch):
    """The liger adapter, its kernels interpreted on CPU.

    The interpreter hands a Python float argument to the kernel as a Python float, where compiled
    Triton passes an fp32 scalar; Liger's weighted path calls `.to()` on two of them
    (sum_non_ignore_weight, weight_sum) and fails. They are wrapped as fp32 scalars, as the compiler
    passes them.
    """
    pytest.importorskip("liger_kernel")
    if not TRITON_INTERPRETER:
        pytest.skip("Liger's kernels on CPU need Triton, imported with TRITON_INTERPRET=1")
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def fp32_scalars(arg):
        if isinstance(arg, float):
            return tl.tensor(
                interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32
            )
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", fp32_scalars)
    return peers.liger_label_smoothing


def check_liger(fn, logits, target, **kwargs):
    """helpers.check, except for bfloat16 with a scalar loss: the interpreter multiplies bfloat16 by
    bfloat16 wrongly (inf, Triton 3.9), which Liger's backward does for an upstream gradient other
    than 1, so there the gradient checked is that of loss.backward() (upstream 1: no multiplication)."""
    if logits.dtype != torch.bfloat16 or kwargs["reduction"] == "none":
        return check(fn, exact_reference, logits, target, **kwargs)
    rtol, atol = TOLERANCE[torch.bfloat16]
    loss = fn(logits.clone(), target, **kwargs)
    torch.testing.assert_close(
        loss.double(), exact_reference(logits.double(), target, **kwargs), rtol=rtol, atol=atol
    )
    grad = plain_grad(fn, logits, target, **kwargs)
    expected = plain_grad(exact_reference, logits.double(), target, **kwargs)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol)


def declared_cases(impl):
    """Every dtype and reduction the entry declares."""
    for dtype in impl.dtypes:
        for reduction in impl.reductions:
            yield dtype, reduction


# numpy, under the interpreter, on the masked lanes of Liger's weighted sums (-inf x 0, then discarded)
MASKED_LANES = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")


@MASKED_LANES
@pytest.mark.parametrize("dtype, reduction", list(declared_cases(lsr.get("liger"))))
def test_liger_takes_every_dtype_and_reduction_it_declares(liger, dtype, reduction):
    impl = lsr.get("liger")
    assert impl.supports_weight and impl.supports_ignore_index
    dtype = DTYPES[dtype]
    weight = torch.rand(50, generator=torch.Generator().manual_seed(7)) + 0.5
    logits, target = random_problem((8, 50), scale=2.0, dtype=dtype, ignore_fraction=0.3, seed=8)
    for kwargs in [{}, {"weight": weight}]:
        check_liger(liger, logits, target, smoothing=0.1, reduction=reduction, **kwargs)
    logits, target = random_problem((8, 50), dtype=dtype, seed=9, ignore_index=3)
    check_liger(liger, logits, target, smoothing=0.0, reduction=reduction, ignore_index=3)


@pytest.mark.parametrize("shape", [(3, 7, 4), (2, 5, 2, 3), (7,), (5, 1)])
def test_liger_takes_every_layout_and_a_single_class(liger, shape):
    logits, target = random_problem(shape, ignore_fraction=0.0 if len(shape) == 1 else 0.3, seed=10)
    for reduction in ("mean", "none"):
        check(liger, exact_reference, logits, target, smoothing=0.3, reduction=reduction)


def test_liger_computes_in_float32_so_float64_is_not_declared(liger):
    logits, target = random_problem((8, 50), dtype=torch.float64, seed=11)
    loss, grad = loss_and_grad(liger, logits, target, smoothing=0.1, reduction="none")
    ref_loss, _ = loss_and_grad(exact_reference, logits, target, smoothing=0.1, reduction="none")
    rtol, atol = TOLERANCE[torch.float64]
    assert loss.dtype == torch.float64 and not torch.allclose(loss, ref_loss, rtol=rtol, atol=atol)
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)


def test_liger_forward_overwrites_the_logits_with_their_gradient(liger):
    """(N, C) logits hold the gradient after the forward alone; (N, C, d1) ones are copied to rows first."""
    logits, target = random_problem((6, 10), ignore_fraction=0.3, seed=12)
    x = logits.clone().requires_grad_(True)
    liger(x, target, 0.1, "sum")
    z = logits.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(exact_reference(z, target, 0.1, "sum"), z)
    torch.testing.assert_close(x.detach().double(), expected, rtol=1e-5, atol=1e-6)

    spatial, target = random_problem((3, 10, 2), seed=13)
    x = spatial.clone().requires_grad_(True)
    liger(x, target, 0.1, "sum")
    assert torch.equal(x.detach(), spatial)


def test_liger_zeroes_ignored_rows_even_without_autograd(liger):
    logits, target = random_problem((6, 10), seed=14)
    target[2] = -100
    x = logits.clone()
    with torch.no_grad():
        liger(x, target, 0.1, "mean")
    assert torch.equal(x[2], torch.zeros(10)) and torch.equal(x[target != -100], logits[target != -100])


@MASKED_LANES
@pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning")  # its inf
def test_liger_differs_from_pytorch_where_its_notes_say(liger):
    logits, _ = random_problem((4, 6), seed=15)
    ignored = torch.full((4,), -100)
    # A mean over no valid target: 0, where F.cross_entropy's is 0/0 = NaN
    assert liger(logits.clone(), ignored, 0.1, "mean") == 0
    assert torch.isnan(F.cross_entropy(logits, ignored, label_smoothing=0.1))
    # A mean over targets of weight 0: inf (the smoothing terms over 0), where F's is NaN
    weight, target = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 1, 0, 1])
    assert liger(logits.clone(), target, 0.1, "mean", weight=weight) == float("inf")
    assert torch.isnan(F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1))
    with pytest.raises(ValueError, match="empty batch"):
        liger(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), 0.1)


@MASKED_LANES
@pytest.mark.parametrize("weighted", [False, True])
def test_liger_passes_the_benchmark_gate(liger, weighted):
    """The benchmark's correctness gate and timed pass, with the entry moved to CPU: the gate gives an
    in-place implementation a fresh copy of the logits for each call of the loss."""
    from lsr.bench import measure
    from lsr.bench.data import Case

    impl = dataclasses.replace(lsr.get("liger"), devices=("cpu",), is_available=lambda device: True)
    case = Case(
        implementation="liger",
        device="cpu",
        dtype="float32",
        batch=24,
        classes=40,
        smoothing=0.1,
        pass_="forward+backward",
        ignore_fraction=0.3,
        weighted=weighted,
    )
    problem = measure.Problem.make(case)
    before = problem.logits.detach().clone()
    assert measure.check_against_reference(case, problem, impl) < 1e-5
    timed = measure.TimedPass(case, problem, impl)
    timed(), timed()
    assert torch.equal(problem.logits.detach(), before)  # the pass overwrote a copy of its own
