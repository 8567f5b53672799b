"""The C++ kernels on CPU (lsr.fused.cpp, csrc/fused.cpp), each against a float64 reference written
from the definitions, every dtype, and against the plain-PyTorch fallback (cpu.py's "eager"): the
one-pass `forward_gradient` (row losses and gradient), `row_stats` and `gradient`. That they run on
every core, and inside torch.compile, at the end. The losses built on them are tested with every CPU
backend in test_fused.py and test_fused_onepass.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from lsr.constants import PAPER_EPS
from lsr.fused import cpp, cpu, cpu_options

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (relative, absolute) tolerance of the gradient, stored in the logits' dtype
GRAD_TOL = {
    torch.float32: (1e-4, 1e-7),
    torch.float64: (1e-10, 1e-13),
    torch.bfloat16: (1e-2, 1e-6),
    torch.float16: (2e-3, 1e-6),
}
LOSS_TOL = {torch.float64: (1e-10, 1e-12)}  # losses are float32 otherwise: (1e-5, 1e-5)


CPP = pytest.mark.skipif(cpp.build_problem() is not None, reason=str(cpp.build_problem()))


def backends():
    """The C++ kernels wherever they can be built (a build failure there fails these tests), and the
    plain-PyTorch fallback always."""
    return [pytest.param("cpp", marks=CPP), "eager"]


@pytest.fixture(params=backends())
def backend(request):
    if request.param == "cpp":
        assert cpp.extension() is not None, "the C++ kernels failed to build (see the warning)"
    with cpu_options(request.param):
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
    row_loss = cpu.forward_gradient(grad, target, weight, scale, smoothing, sparse)
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
    row_loss = cpu.forward_gradient(grad, target, None, scale, 0.1, False)
    assert row_loss[0].isnan() and grad[0].isnan().all()
    check(logits[3:], target[3:], None, scale[3:], 0.1, False)  # the other rows are untouched


# --- the two-pass kernels: row_stats, then gradient (new memory or in place) ----------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "sparse, weighted", [(False, False), (False, True), (True, False)], ids=["exact", "weighted", "sparse"]
)
# 20001: longer than row_stats' float32 copy of a half row (kWideRowMax), so half rows are widened twice
@pytest.mark.parametrize("n_classes", [2, 1001, 20001])
def test_row_stats_and_gradient_match_float64(backend, dtype, sparse, weighted, n_classes):
    logits, target, weight, scale = random_case(
        dtype, {2: 9, 1001: 150}.get(n_classes, 12), n_classes, weighted
    )
    logits[0, -1] = float("-inf")  # a masked class
    acc = scale.dtype
    lse, z_y, dot, one_minus_p_y = cpu.row_stats(logits, target, weight, acc, sparse)
    z = logits.double()
    onehot = torch.nn.functional.one_hot(target, n_classes).bool()
    rtol, atol = LOSS_TOL.get(dtype, (1e-5, 1e-5))
    torch.testing.assert_close(lse.double(), z.logsumexp(1), rtol=rtol, atol=atol)
    torch.testing.assert_close(z_y.double(), z[onehot])
    if sparse:
        assert dot is None
        expected = torch.where(onehot, 0.0, z.softmax(1)).sum(1)
        torch.testing.assert_close(one_minus_p_y.double(), expected, rtol=rtol, atol=atol)
    else:
        assert one_minus_p_y is None
        w = torch.ones(n_classes, dtype=torch.float64) if weight is None else weight.double()
        finite = z.isfinite().all(1)  # the masked class makes row 0's dot -inf, in both
        torch.testing.assert_close(dot.double()[finite], (z * w).sum(1)[finite], rtol=rtol, atol=1e-3)
        assert dot[0] == float("-inf")
    # p exp(z - lse) - r w off the target, t on it; NaN rows propagate (scale has one)
    p, r, t = scale, scale * 0.3, scale * -0.5
    w = 1.0 if weight is None else weight.double()
    expected = p.double()[:, None] * (z - lse.double()[:, None]).exp() - r.double()[:, None] * w
    expected[onehot] = t.double()
    rtol, atol = GRAD_TOL[dtype]
    for inplace in (False, True):
        given = logits.clone() if inplace else logits
        grad = cpu.gradient(given, target, weight, lse, p, r, t, inplace)
        assert grad.dtype == dtype and (grad.data_ptr() == given.data_ptr()) == inplace
        torch.testing.assert_close(grad.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_row_stats_of_a_nan_or_inf_row_are_nan(backend, bad):
    logits, target, _, scale = random_case(torch.float32, 4, 37, weighted=False)
    logits[0, 5] = bad
    for sparse in (False, True):
        lse, _, dot, one_minus_p_y = cpu.row_stats(logits, target, None, torch.float32, sparse)
        assert lse[0].isnan() and lse[1:].isfinite().all()
        assert (one_minus_p_y if sparse else lse)[0].isnan()


# The sweeps' exp, relative error where exp(x) >= 1e-30 (measured over every float32 in [-110, 0]):
# our AVX-512 exp 1.7e-7, ATen's exp_u20 (other ISAs) 3.4e-7
SWEEP_EXP_TOL = {"AVX512": 2e-7}


@CPP
def test_the_sweeps_exp_matches_float64():
    """The exp every kernel sweep uses, over its domain (x <= 0): a sample of float32 bit patterns
    from -0 to -110 (every 251st; each exponent and many mantissas), against float64. The kernels'
    float64 tests alone would let a small error through, since their sums average it out."""
    bits = torch.arange(-(2**31), int(torch.tensor(-110.0).view(torch.int32)) + 1, 251, dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.tensor([0.0, -0.0, -math.inf, -200.0])])
    got = cpp.sweep_exp(x).double()
    want = torch.exp(x.double())
    large = want >= 1e-30
    relative = ((got - want).abs() / want)[large].max().item()
    assert relative <= SWEEP_EXP_TOL.get(cpp.isa(), 4e-7), relative
    assert (got - want)[~large].abs().max().item() <= 1e-36  # subnormal or 0, as float64 rounds
    assert got[-4:].tolist() == [1.0, 1.0, 0.0, 0.0]  # exp(0) = 1 exactly: the row max's term
    double = torch.linspace(-700, 0, 10007, dtype=torch.float64)
    torch.testing.assert_close(cpp.sweep_exp(double), torch.exp(double), rtol=1e-14, atol=0)


def test_fallback_in_blocks_matches_reference():
    with cpu_options("eager", eager_block_elements=40):  # 3 rows of 13 per block, a ragged last
        check(*random_case(torch.float32, 10, 13, weighted=True), 0.1, False)


@CPP
def test_bad_input_is_refused():
    logits, target, _, scale = random_case(torch.float32, 4, 6, weighted=False)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpp.forward_gradient(logits.t(), target, None, scale, 0.1, False)
    with pytest.raises(RuntimeError, match="scale must be .* in the compute dtype"):
        cpp.forward_gradient(logits, target, None, scale.double(), 0.1, False)
    with pytest.raises(RuntimeError, match="2 classes"):
        cpp.forward_gradient(logits[:, :1].contiguous(), target * 0, None, scale, 0.1, True)
    with pytest.raises(RuntimeError, match="weight must be \\(C,\\)"):
        cpp.row_stats(logits, target, torch.ones(5), False)
    with pytest.raises(RuntimeError, match="out must be"):
        cpp.gradient(logits, target, None, scale, scale, scale, scale, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="backend"):
        cpu.set_cpu_backend("fortran")


def test_without_a_compiler_the_fallback_is_chosen(monkeypatch):
    monkeypatch.setattr(cpp, "build_problem", lambda: "no C++ compiler on PATH")
    monkeypatch.delenv("LSR_CPP", raising=False)
    cpp.extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert cpu.cpu_backend(cpu.COMPILE_MIN_ELEMENTS - 1) == "eager"
        with pytest.raises(ValueError, match="'cpp' CPU backend is unavailable here: no C\\+\\+ compiler"):
            cpu.set_cpu_backend("cpp")
        check(*random_case(torch.float32, 5, 9, weighted=False), 0.1, False)
        monkeypatch.setenv("LSR_CPP", "1")  # CI's demand for the C++ kernels: an error, not a fallback
        cpp.extension.cache_clear()
        with pytest.raises(RuntimeError, match="LSR_CPP=1"):
            cpp.extension()
    finally:
        cpp.extension.cache_clear()  # the next caller builds (or loads) the real kernels again


def test_overwriting_saved_logits_makes_backward_raise(backend):
    x = torch.randn(4, 5, requires_grad=True)
    logits = x.exp()  # saves its output for backward
    with torch.no_grad():
        cpu.forward_gradient(logits, torch.zeros(4, dtype=torch.long), None, torch.ones(4), 0.1, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


# --- every core, and inside torch.compile --------------------------------------------------------------


def check_runs_on_two_threads():
    """Each C++ kernel's rows run on 2 threads when torch has 2: a build without OpenMP ignores
    at::parallel_for's pragma and runs every row on the calling thread (as fast a test as any)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n_classes = 1000
        n_rows = 8 * (1 << 16) // n_classes  # 8 of the kernels' parallel tasks (about 64K logits each)
        logits, target, _, scale = random_case(torch.float32, n_rows, n_classes, weighted=False)
        lse, _ = cpp.row_stats(logits, target, None, False)
        one = torch.ones(())
        ops = {
            "row_stats": lambda: cpp.row_stats(logits, target, None, True),
            "gradient": lambda: cpp.gradient(
                logits, target, None, lse, scale, scale, scale, torch.empty_like(logits)
            ),
            "gradient in place": lambda: cpp.gradient(
                logits, target, None, lse, scale, scale, scale, out=logits
            ),
            "forward_gradient": lambda: cpp.forward_gradient(logits, target, None, scale, 0.1, False),
            "loss_forward": lambda: cpp.loss_forward(logits, target, None, 0.1, False, "mean", -100, True),
            "loss_backward": lambda: cpp.loss_backward(
                logits, target, None, lse, scale, scale, scale, 0.1, one, torch.empty_like(logits)
            ),
            "loss_backward in place": lambda: cpp.loss_backward(
                logits, target, None, lse, scale, scale, scale, 0.1, one, logits
            ),
            "onepass_loss": lambda: cpp.onepass_loss(logits, target, None, 0.1, True, "sum", -100, True),
        }
        for name, run in ops.items():
            run()
            assert cpp.threads_used() == 2, f"{cpp._build_name()}: {name} ran on one thread"
    finally:
        torch.set_num_threads(threads)


@CPP
def test_the_kernels_leave_the_threads_denormal_mode_as_they_found_it():
    """The sweeps flush denormals to zero (an exp below float32's smallest normal took a microcode
    assist) and restore each thread's mode after: a denormal survives arithmetic on every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logits, target, _, scale = random_case(torch.float32, 512, 1000, weighted=False)
        cpp.forward_gradient(logits, target, None, scale, 0.1, False)
        assert cpp.threads_used() == 2
        tiny = torch.full((1 << 20,), 1e-39) * 1.0  # run on both intra-op threads
        assert tiny.ne(0).all()
    finally:
        torch.set_num_threads(threads)


@CPP
def test_the_kernels_run_on_every_thread():
    check_runs_on_two_threads()
    assert cpp.openmp() == torch._C.has_openmp


@CPP
@pytest.mark.skipif(not torch._C.has_openmp, reason="torch has no OpenMP: every build is serial")
def test_the_thread_check_catches_a_build_without_openmp(tmp_path):
    """The same check fails on the kernels built with LSR_CPP_OPENMP=0 (a second build, in a child)."""
    script = tmp_path / "serial.py"
    script.write_text(
        "import sys; sys.path.insert(0, 'tests')\n"
        "from lsr.fused import cpp\n"
        "from test_cpp_kernels import check_runs_on_two_threads\n"
        "assert not cpp.openmp() and '_serial_' in cpp._build_name()\n"
        "try:\n"
        "    check_runs_on_two_threads()\n"
        "except AssertionError as error:\n"
        "    print('caught:', error)\n"
    )
    env = os.environ | {"LSR_CPP_OPENMP": "0", "LSR_CPP": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "caught: lsr_fused_" in done.stdout and "ran on one thread" in done.stdout


@CPP
@pytest.mark.parametrize("sparse", [False, True], ids=["exact", "sparse"])
@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_the_ops_run_inside_a_compiled_model(sparse, one_pass):
    """Linear -> fused loss under torch.compile(fullgraph=True): the C++ ops are nodes of the
    compiled graphs (called in inductor's code: loss_forward forward and loss_backward backward, or
    the one-pass op writing into the logits' buffer), and three SGD steps match eager float64
    F.cross_entropy / equation 15."""
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
    loss_fn = loss_class(0.1, validate_targets=False, gradient_in_forward=one_pass)
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
            loss, (forward_code, backward_code) = run_and_get_code(step)
            if one_pass:
                assert "torch.ops.lsr_fused.onepass_loss" in forward_code
            else:
                assert "torch.ops.lsr_fused.loss_forward" in forward_code
                assert "torch.ops.lsr_fused.loss_backward" in backward_code
        else:
            loss = step()
        expected = 0.5 * reference(model64(inputs.double()), target, 0.1)
        expected.backward()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        for opt in optimizers:
            opt.step()
    for p, p64 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)
