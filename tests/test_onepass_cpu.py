"""The one-pass CPU kernel (lsr.fused.onepass_cpu): C++ and plain-PyTorch versions against float64
references written from the definitions, row losses and gradients, every dtype."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from lsr.constants import PAPER_EPS
from lsr.fused import onepass_cpu

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (relative, absolute) tolerance of the gradient, stored in the logits' dtype
GRAD_TOL = {
    torch.float32: (1e-4, 1e-7),
    torch.float64: (1e-10, 1e-13),
    torch.bfloat16: (1e-2, 1e-6),
    torch.float16: (2e-3, 1e-6),
}
LOSS_TOL = {torch.float64: (1e-10, 1e-12)}  # losses are float32 otherwise: (1e-5, 1e-5)


def backends():
    """The C++ kernel wherever it can be built (a build failure there fails these tests), and the
    plain-PyTorch fallback always."""
    problem = onepass_cpu.build_problem()
    cpp = pytest.param("cpp", marks=pytest.mark.skipif(problem is not None, reason=problem or ""))
    return [cpp, "torch"]


@pytest.fixture(params=backends())
def backend(request):
    if request.param == "cpp":
        assert onepass_cpu.extension() is not None, "the C++ kernel failed to build (see the warning)"
    with onepass_cpu.backend_options(request.param):
        yield request.param


def reference(logits, target, weight, scale, smoothing, sparse):
    """Row losses and the gradient of sum_i scale_i loss_i in float64, from the definitions:
    exact -sum_j w_j q_j log p_j with q_j = eps/C + (1 - eps)[j = y]; SparseLSR equation 15 with
    1 - p_y = sum over j != y of p_j."""
    z = logits.detach().double().requires_grad_(True)
    num_classes = z.shape[1]
    log_p = z.log_softmax(dim=1)
    onehot = torch.nn.functional.one_hot(target, num_classes).double()
    if sparse:
        a = 1 - smoothing + smoothing / num_classes
        b = smoothing * (num_classes - 1) / num_classes
        one_minus_p_y = (log_p.exp() * (1 - onehot)).sum(dim=1)
        log_p_y = (log_p * onehot).sum(dim=1)
        row_loss = -a * log_p_y - b * torch.log((one_minus_p_y + PAPER_EPS) / (num_classes - 1))
    else:
        q = smoothing / num_classes + (1 - smoothing) * onehot
        w = torch.ones(num_classes, dtype=torch.float64) if weight is None else weight.double()
        # at eps = 0 the q_j = 0 terms are dropped, not 0 * log p_j (a masked class has log p = -inf)
        row_loss = -torch.where(q > 0, w * q * log_p, 0.0).sum(dim=1)
    (row_loss * scale.double()).sum().backward()
    return row_loss.detach(), z.grad


def random_case(dtype, n_rows, n_classes, weighted, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(n_rows, n_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, n_classes, (n_rows,), generator=gen)
    weight = (torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5).to(acc) if weighted else None
    scale = (torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.25).to(acc)
    scale[1 % n_rows] = 0.0  # an ignored row
    if n_rows > 2:
        scale[2] = float("nan")
    return logits, target, weight, scale


def check(logits, target, weight, scale, smoothing, sparse):
    expected_loss, expected_grad = reference(logits, target, weight, scale, smoothing, sparse)
    grad = logits.clone()
    row_loss = onepass_cpu.forward_gradient(grad, target, weight, scale, smoothing, sparse)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert row_loss.dtype == acc and grad.dtype == logits.dtype
    rtol, atol = LOSS_TOL.get(logits.dtype, (1e-5, 1e-5))
    torch.testing.assert_close(row_loss.double(), expected_loss, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[logits.dtype]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol, equal_nan=True)
    return row_loss, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "sparse, weighted", [(False, False), (False, True), (True, False)], ids=["exact", "weighted", "sparse"]
)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n_classes", [2, 1001])
def test_matches_float64_reference(backend, dtype, sparse, weighted, smoothing, n_classes):
    # 150 rows of 1001: several parallel tasks, and a column tail past every vector width
    case = random_case(dtype, 150 if n_classes > 2 else 9, n_classes, weighted)
    _, grad = check(*case, smoothing, sparse)
    assert (grad[1] == 0).all()  # scale 0: an ignored row contributes nothing
    assert grad[2].isnan().all()  # scale NaN: a NaN upstream gradient propagates


def test_one_class_exact(backend):
    row_loss, grad = check(*random_case(torch.float32, 5, 1, weighted=False), 0.1, False)
    torch.testing.assert_close(row_loss, torch.zeros(5), rtol=0, atol=1e-6)  # log p_y = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparse", [False, True], ids=["exact", "sparse"])
def test_vocabulary_sized_rows(backend, dtype, sparse):
    check(*random_case(dtype, 3, 50257, weighted=not sparse), 0.1, sparse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sparse_keeps_the_digits_of_one_minus_p_y(backend, dtype):
    # p_y within 1e-6 of 1: 1 - p_y formed by subtraction would keep about one digit in float32
    logits = torch.tensor([[20.0, 5.0, 4.0], [30.0, 12.0, 14.0]], dtype=dtype)
    target = torch.tensor([0, 0])
    acc = dtype
    scale = torch.ones(2, dtype=acc)
    row_loss, grad = check(logits, target, None, scale, 0.15, True)
    one_minus_p_y = (logits.double().softmax(1)[:, 1:]).sum(1)
    torch.testing.assert_close(-grad[:, 0].double(), one_minus_p_y * (grad[:, 0].double() / -one_minus_p_y))
    assert math.isclose(row_loss[0].item(), 1.5166, rel_tol=1e-4)  # lsr/fused/algebra.py's example


def test_masked_class_at_zero_smoothing(backend):
    logits, target, _, scale = random_case(torch.float32, 6, 11, weighted=False)
    logits[:, 3] = float("-inf")
    target[target == 3] = 4
    row_loss, grad = check(logits, target, None, scale, 0.0, False)
    assert row_loss.isfinite().all() and (grad[scale.isfinite(), 3] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_logit_makes_its_row_nan(backend, bad):
    logits, target, _, scale = random_case(torch.float32, 4, 37, weighted=False)
    logits[0, 5] = bad
    grad = logits.clone()
    row_loss = onepass_cpu.forward_gradient(grad, target, None, scale, 0.1, False)
    assert row_loss[0].isnan() and grad[0].isnan().all()
    check(logits[3:], target[3:], None, scale[3:], 0.1, False)  # the other rows are untouched


def test_fallback_in_blocks_matches_reference(monkeypatch):
    monkeypatch.setattr(onepass_cpu, "BLOCK_ELEMENTS", 40)  # 3 rows of 13 per block, a ragged last
    with onepass_cpu.backend_options("torch"):
        check(*random_case(torch.float32, 10, 13, weighted=True), 0.1, False)


def test_bad_input_is_refused():
    logits, target, _, scale = random_case(torch.float32, 4, 6, weighted=False)
    with pytest.raises(ValueError, match="contiguous"):
        onepass_cpu.forward_gradient(logits.t(), target, None, scale, 0.1, False)
    with pytest.raises(TypeError, match="float32"):
        onepass_cpu.forward_gradient(logits, target, None, scale.double(), 0.1, False)
    with pytest.raises(TypeError, match="float16"):
        onepass_cpu.forward_gradient(logits.int(), target, None, scale, 0.1, False)
    with pytest.raises(ValueError, match="2 classes"):
        onepass_cpu.forward_gradient(logits[:, :1].contiguous(), target * 0, None, scale, 0.1, True)
    with pytest.raises(ValueError, match="backend"):
        onepass_cpu.set_backend("fortran")


def test_without_a_compiler_the_fallback_is_chosen(monkeypatch):
    monkeypatch.setattr(onepass_cpu, "build_problem", lambda: "no C++ compiler on PATH")
    monkeypatch.delenv("LSR_ONEPASS_CPP", raising=False)
    onepass_cpu.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert onepass_cpu.backend() == "torch"
        check(*random_case(torch.float32, 5, 9, weighted=False), 0.1, False)
        monkeypatch.setenv("LSR_ONEPASS_CPP", "1")  # CI's demand for the C++ kernel: an error, not a fallback
        onepass_cpu.extension.cache_clear()
        with pytest.raises(RuntimeError, match="LSR_ONEPASS_CPP=1"):
            onepass_cpu.extension()
    finally:
        onepass_cpu.extension.cache_clear()  # the next caller builds (or loads) the real kernel again


def test_overwriting_saved_logits_makes_backward_raise(backend):
    x = torch.randn(4, 5, requires_grad=True)
    logits = x.exp()  # saves its output for backward
    with torch.no_grad():
        onepass_cpu.forward_gradient(
            logits, torch.zeros(4, dtype=torch.long), None, torch.ones(4), 0.1, False
        )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


# --- every core, and inside torch.compile --------------------------------------------------------------

CPP = pytest.mark.skipif(onepass_cpu.build_problem() is not None, reason=str(onepass_cpu.build_problem()))


def check_runs_on_two_threads():
    """The C++ kernel's rows run on 2 threads when torch has 2: a build without OpenMP ignores
    at::parallel_for's pragma and runs every row on the calling thread (as fast a test as any)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n_classes = 1000
        n_rows = 8 * (1 << 16) // n_classes  # 8 of the kernel's parallel tasks (about 64K logits each)
        logits, target, _, scale = random_case(torch.float32, n_rows, n_classes, weighted=False)
        with onepass_cpu.backend_options("cpp"):
            onepass_cpu.forward_gradient(logits, target, None, scale, 0.1, False)
        assert onepass_cpu.threads_used() == 2, f"{onepass_cpu._build_name()} ran on one thread"
    finally:
        torch.set_num_threads(threads)


@CPP
def test_the_kernel_runs_on_every_thread():
    check_runs_on_two_threads()
    assert onepass_cpu.openmp() == torch._C.has_openmp


@CPP
@pytest.mark.skipif(not torch._C.has_openmp, reason="torch has no OpenMP: every build is serial")
def test_the_thread_check_catches_a_build_without_openmp(tmp_path):
    """The same check fails on the kernel built with LSR_ONEPASS_OPENMP=0 (a second build, in a child)."""
    script = tmp_path / "serial.py"
    script.write_text(
        "import sys; sys.path.insert(0, 'tests')\n"
        "from lsr.fused import onepass_cpu\n"
        "from test_onepass_cpu import check_runs_on_two_threads\n"
        "assert not onepass_cpu.openmp() and '_serial_' in onepass_cpu._build_name()\n"
        "try:\n"
        "    check_runs_on_two_threads()\n"
        "except AssertionError as error:\n"
        "    print('caught:', error)\n"
    )
    env = os.environ | {"LSR_ONEPASS_OPENMP": "0", "LSR_ONEPASS_CPP": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "caught: lsr_onepass_" in done.stdout and "ran on one thread" in done.stdout


@CPP
@pytest.mark.parametrize("sparse", [False, True], ids=["exact", "sparse"])
def test_the_op_runs_inside_a_compiled_model(sparse):
    """Linear -> one-pass loss under torch.compile(fullgraph=True): the C++ op is a node of the
    compiled graph (called in inductor's code, writing into the logits' buffer), and three SGD steps
    match eager float64 F.cross_entropy / equation 15."""
    from torch._inductor.utils import run_and_get_code

    from lsr.fused import FusedLSRLoss, FusedSparseLSRLoss
    from lsr.reference import exact_reference, sparse_reference

    torch.manual_seed(0)
    inputs, target = torch.randn(48, 16), torch.randint(0, 50, (48,))
    target[::7] = -100
    model = torch.nn.Linear(16, 50)
    model64 = torch.nn.Linear(16, 50).double()
    model64.load_state_dict(model.state_dict())
    loss_class = FusedSparseLSRLoss if sparse else FusedLSRLoss
    loss_fn = loss_class(0.1, validate_targets=False, gradient_in_forward=True)
    reference = sparse_reference if sparse else exact_reference

    @torch.compile(fullgraph=True)
    def compiled_loss():
        return 0.5 * loss_fn(model(inputs), target)

    def step():
        loss = compiled_loss()
        loss.backward()
        return loss

    models, optimizers = (model, model64), [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, model64)]
    for i in range(3):
        for opt in optimizers:
            opt.zero_grad()
        if i == 0:
            loss, (forward_code, _) = run_and_get_code(step)
            assert "torch.ops.lsr_onepass.forward_gradient" in forward_code
        else:
            loss = step()
        expected = 0.5 * reference(model64(inputs.double()), target, 0.1)
        expected.backward()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        for opt in optimizers:
            opt.step()
    for p, p64 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)
