"""What a head case (`Case.hidden > 0`, `lsr.heads`) times and how it is gated: its inputs
(`HeadProblem`: hidden states, an lm_weight, targets), the pass over them (`HeadTimedPass`, or the
three GEMMs alone for `floor-gemm`), and the float64 gate (`check_head_against_reference`).

The gate runs the loss on the case's first `HEAD_GATE_TOKENS` tokens with the whole lm_weight and
compares the mean loss and both gradients (d_hidden, d_lm_weight, whole) with float64 computed from
the definition a chunk of rows at a time (never N x V float64 at once); then, where the case has
more tokens, runs it at the timed shape and compares d_hidden at rows spread over the batch.
"""

from __future__ import annotations

import warnings

import torch

from lsr.bench.data import FLOOR_GEMM, IGNORE_INDEX, Case
from lsr.bench.measure.gate import GATE_TOLERANCE, GateFailure, gate_rows, relative_norm_error
from lsr.bench.measure.problem import TimedPass
from lsr.heads import HeadImplementation, TorchFellBack
from lsr.types import DTYPES

HEAD_GATE_TOKENS = 1024
REFERENCE_CHUNK_ELEMENTS = 2**23  # float64 logits per chunk of the reference (64 MiB)


class HeadProblem:
    """Hidden states (N, H) ~ N(0, 1) and an lm_weight (V, H) ~ N(0, logit_std^2 / H), so that the
    logits have the logits losses' spread (`logit_std`): an unscaled weight would give logits of
    std sqrt(H), a softmax of float32 denormals, and GEMMs that run 20x slower on x86 (measured).
    Targets uniform, a fraction `case.ignore_fraction` of them IGNORE_INDEX (never all)."""

    def __init__(self, hidden: torch.Tensor, lm_weight: torch.Tensor, target: torch.Tensor):
        self.hidden, self.lm_weight, self.target = hidden, lm_weight, target

    @classmethod
    def make(cls, case: Case, logit_std: float = 2.0, seed: int = 0) -> HeadProblem:
        device = torch.device(case.device)
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[case.dtype]

        def normal(*shape, std):
            return (torch.randn(shape, generator=gen, device=device) * std).to(dtype).requires_grad_(True)

        hidden = normal(case.batch, case.hidden, std=1.0)
        lm_weight = normal(case.classes, case.hidden, std=logit_std / case.hidden**0.5)
        target = torch.randint(0, case.classes, (case.batch,), generator=gen, device=device)
        n_ignored = min(round(case.ignore_fraction * case.batch), case.batch - 1)
        target[torch.randperm(case.batch, generator=gen, device=device)[:n_ignored]] = IGNORE_INDEX
        return cls(hidden, lm_weight, target)


class HeadTimedPass(TimedPass):
    """The callable a head case times: `TimedPass`'s passes over (hidden, lm_weight), gradients
    returned, never accumulated; `impl` None: floor-gemm, the three GEMMs under no_grad."""

    prepares = False

    def __init__(self, case: Case, problem: HeadProblem, impl: HeadImplementation | None, loss_fn=None):
        self.device = problem.hidden.device
        self.case, self.problem = case, problem
        if impl is None:
            if case.implementation != FLOOR_GEMM:
                raise ValueError(f"no head floor named {case.implementation!r}")
            self._step = HeadTimedPass._gemms
            return
        self.loss_fn = loss_fn or impl.loss
        self._choose_pass()

    def _differentiated(self) -> tuple[torch.Tensor, ...]:
        return self.problem.hidden, self.problem.lm_weight

    note = ""  # what the loss said it did differently (torch's fallback), for the row's message

    def _loss(self) -> torch.Tensor:
        p = self.problem
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", TorchFellBack)
            loss = self.loss_fn(p.hidden, p.lm_weight, p.target, self.case.smoothing, "mean", IGNORE_INDEX)
        for warning in said:
            if issubclass(warning.category, TorchFellBack):
                self.note = f"torch fell back to its materialising path: {str(warning.message)[:120]}"
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return loss

    def _gemms(self):
        with torch.no_grad():
            h, w = self.problem.hidden, self.problem.lm_weight
            z = h @ w.t()  # the logits (N, V)
            return z @ w, z.t() @ h  # d_hidden's and d_lm_weight's products, z standing in for dL/dz


def reference_mean_and_grads(
    impl: HeadImplementation,
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    target: torch.Tensor,
    smoothing: float,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The float64 mean loss and its gradients (d_hidden, d_lm_weight), a chunk of rows at a time:
    per chunk the reference's row losses summed, their gradient g (rows x V) by autograd, then
    d_hidden = g @ W and d_lm_weight += g^T @ h; all over the mean's denominator."""
    h, w = hidden.detach().double(), lm_weight.detach().double()
    valid = target != IGNORE_INDEX
    denominator = float(valid.sum())
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // w.shape[0])
    total, d_hidden, d_weight = 0.0, torch.empty_like(h), torch.zeros_like(w)
    for start in range(0, h.shape[0], rows):
        chunk = slice(start, start + rows)
        logits = (h[chunk] @ w.t()).requires_grad_(True)
        loss = impl.logits_reference(logits, target[chunk], smoothing, "sum", IGNORE_INDEX)
        (g,) = torch.autograd.grad(loss, logits)
        total += float(loss.detach())
        d_hidden[chunk] = g @ w
        d_weight += g.t() @ h[chunk]
    return total / denominator, d_hidden / denominator, d_weight / denominator


def _run(loss_fn, hidden, lm_weight, target, smoothing):
    """The mean loss and its gradients (d_hidden, d_lm_weight) of leaves sharing the given storage."""
    hidden, lm_weight = (t.detach().requires_grad_(True) for t in (hidden, lm_weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchFellBack)  # said by the timed pass, in the row's message
        loss = loss_fn(hidden, lm_weight, target, smoothing, "mean", IGNORE_INDEX)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, lm_weight)))


def check_head_against_reference(
    case: Case, problem: HeadProblem, impl: HeadImplementation, loss_fn=None
) -> float:
    """Two checks against float64; return the largest relative error; raise GateFailure past the
    dtype's tolerance (GATE_TOLERANCE):
    - the case's first HEAD_GATE_TOKENS tokens alone: the mean loss, d_hidden and the whole
      d_lm_weight;
    - the whole case, at the shape that is timed (what compiled or chunked code runs there): d_hidden
      at GATE_ROWS rows spread over the batch, each row's gradient needing only its own logits."""
    loss_fn = loss_fn or impl.loss
    n = min(case.batch, HEAD_GATE_TOKENS)
    target = problem.target[:n]
    hidden, lm_weight = problem.hidden.detach()[:n], problem.lm_weight.detach()
    loss, d_hidden, d_weight = _run(loss_fn, hidden, lm_weight, target, case.smoothing)
    ref_loss, ref_d_hidden, ref_d_weight = reference_mean_and_grads(
        impl, hidden, lm_weight, target, case.smoothing
    )
    errors = {
        "loss": abs(float(loss.double()) - ref_loss) / (abs(ref_loss) + 1),
        "d_hidden": relative_norm_error(d_hidden, ref_d_hidden),
        "d_lm_weight": relative_norm_error(d_weight, ref_d_weight),
    }
    del d_hidden, d_weight, ref_d_hidden, ref_d_weight
    if case.batch > n:
        rows = gate_rows(case.batch, problem.hidden.device)
        _, d_hidden, _ = _run(loss_fn, problem.hidden, problem.lm_weight, problem.target, case.smoothing)
        _, ref_rows, _ = reference_mean_and_grads(
            impl, problem.hidden.detach()[rows], lm_weight, problem.target[rows], case.smoothing
        )
        # The mean's gradient is each row's over the whole batch's denominator, the reference's over
        # the sampled rows' own: compare both times their denominator
        whole = float((problem.target != IGNORE_INDEX).sum())
        sampled = float((problem.target[rows] != IGNORE_INDEX).sum())
        errors["d_hidden at the timed shape"] = relative_norm_error(
            d_hidden[rows] * whole, ref_rows * sampled
        )
    tol = GATE_TOLERANCE[case.dtype]
    if not all(err <= tol for err in errors.values()):  # also catches NaN
        said = ", ".join(f"{name} error {err:.2e}" for name, err in errors.items())
        raise GateFailure(f"disagrees with the float64 reference: {said} (tolerance {tol:.0e})")
    return max(errors.values())


def estimated_head_peak_bytes(case: Case, impl: HeadImplementation | None) -> int:
    """What a head case needs at its peak: inputs and their gradients, the implementation's factor x
    the N x V logits (floor-gemm: the logits and the two products), and the gate's float64 lm_weight,
    d_lm_weight, a product of their size and a few reference chunks."""
    itemsize = DTYPES[case.dtype].itemsize
    inputs = (case.batch + case.classes) * case.hidden * itemsize
    logits = case.batch * case.classes * itemsize
    factor = 1.0 if impl is None else impl.peak_factor
    gate = 0 if impl is None else 3 * case.classes * case.hidden * 8 + 3 * REFERENCE_CHUNK_ELEMENTS * 8
    return int(2 * inputs + factor * logits) + case.batch * 8 + gate
