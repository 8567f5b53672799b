"""What a case times: its inputs (`Problem`) and the pass over them (`TimedPass`).

Per-call preparation (`TimedPass.prepare`), never timed: an implementation that writes into its
logits during the forward pass (`gradient_in_forward`, and on CUDA also `inplace_backward`, as
Liger-Kernel does) gets fresh logits, copied from the pristine ones, before every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsr.bench.data import FLOOR, FLOOR_ALLOC, IGNORE_INDEX, Case
from lsr.registry import Implementation
from lsr.types import DTYPES, LossFn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Elements of the float32 blocks the device draws logits in (256 MiB).
MAKE_BLOCK_ELEMENTS = 2**26


@dataclass
class Problem:
    """Random logits (normal, never zeros), targets and class weights for one size, ignore fraction and
    weighting, made once and reused by its cases.

    A fraction `case.ignore_fraction` of the targets (rounded; never all), rows chosen at random, is
    IGNORE_INDEX; with `case.weighted`, the class weights are uniform in [0.5, 1.5) (float32 on the
    device). The logits and the other targets are those of the same size without either, for one seed.
    """

    logits: torch.Tensor  # (batch, classes), requires_grad
    target: torch.Tensor
    weight: torch.Tensor | None = None  # (classes,), when weighted

    @classmethod
    def make(cls, case: Case, logit_std: float = 2.0, seed: int = 0) -> Problem:
        device = torch.device(case.device)
        if device.type == "cuda":
            return cls._make_on_device(case, logit_std, seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        logits = torch.randn(case.batch, case.classes, generator=gen) * logit_std
        target = torch.randint(0, case.classes, (case.batch,), generator=gen)
        # One row is always left, for the mean to average.
        n_ignored = min(round(case.ignore_fraction * case.batch), case.batch - 1)
        ignored = torch.randperm(case.batch, generator=gen)[:n_ignored]
        target[ignored] = IGNORE_INDEX
        weight = torch.rand(case.classes, generator=gen) + 0.5 if case.weighted else None
        logits = logits.to(device=device, dtype=DTYPES[case.dtype]).requires_grad_(True)
        return cls(logits, target.to(device), None if weight is None else weight.to(device))

    @classmethod
    def _make_on_device(cls, case: Case, logit_std: float, seed: int) -> Problem:
        """As `make`, drawn on the device by its own generator: no N x C tensor on the host (65536 x
        131072 float32 logits would need 34 GB of host memory and minutes to copy). The logits are
        drawn in float32 a block of rows at a time, straight into the case's dtype, so that making
        them needs the logits and one block, never a float32 copy of the whole. Other numbers than
        the CPU's for the same seed (another generator)."""
        device = torch.device(case.device)
        gen = torch.Generator(device=device).manual_seed(seed)
        logits = torch.empty(case.batch, case.classes, dtype=DTYPES[case.dtype], device=device)
        rows = max(1, MAKE_BLOCK_ELEMENTS // case.classes)
        for start in range(0, case.batch, rows):
            block = logits[start : start + rows]
            block.copy_(torch.randn(block.shape, generator=gen, device=device).mul_(logit_std))
        target = torch.randint(0, case.classes, (case.batch,), generator=gen, device=device)
        n_ignored = min(round(case.ignore_fraction * case.batch), case.batch - 1)
        ignored = torch.randperm(case.batch, generator=gen, device=device)[:n_ignored]
        target[ignored] = IGNORE_INDEX
        weight = torch.rand(case.classes, generator=gen, device=device) + 0.5 if case.weighted else None
        return cls(logits.requires_grad_(True), target, weight)

    @property
    def options(self) -> dict:
        """The loss's keyword arguments besides the logits, targets, smoothing and reduction."""
        weight = {} if self.weight is None else {"weight": self.weight}
        return {"ignore_index": IGNORE_INDEX, **weight}

    def copy(self) -> Problem:
        """Logits of its own, for an implementation that overwrites them with the gradient.

        They are a non-leaf (a clone of the leaf logits), as a layer's output is in training: an
        in-place loss refuses leaf logits, which would become their own gradient. One copy's memory:
        the leaf they come from is this problem's own.
        """
        logits = self.logits if self.logits.requires_grad else self.logits.detach().requires_grad_(True)
        return Problem(logits.clone(), self.target, self.weight)


def writes_logits_per_call(impl: Implementation | None, device: torch.device) -> bool:
    """Whether every timed call of `impl` on `device` gets fresh logits (`TimedPass.prepare`).

    Always for `gradient_in_forward`: its forward overwrites the logits, and each call must see real
    ones. On CUDA also for `inplace_backward` (fused-exact-inplace, and Liger-Kernel, which writes in
    its forward): every call is bracketed alone there anyway, so the copy costs no timing precision.
    On CPU an `inplace_backward` implementation keeps one copy, later calls reading the gradient as
    logits (the same work), so that its calls are timed in blocks as the committed CPU results were.
    """
    if impl is None:
        return False
    return impl.gradient_in_forward or (impl.inplace_backward and device.type == "cuda")


class TimedPass:
    """The callable a case times: forward, backward or both, for an implementation or a floor.

    forward: the loss with autograd recording, as in training (saved tensors count in its memory).
    backward: `torch.autograd.grad` of a graph built beforehand (kept between runs, not timed).
    The gradient is returned, never accumulated into `.grad`, so repeated runs do the same work.
    `impl` is None for a floor: FLOOR writes exp(z) into a buffer kept across calls, FLOOR_ALLOC
    into a new tensor each call. `loss_fn` replaces the implementation's function (tests plant
    wrong or failing ones with it).

    Calling it runs the pass and synchronises the device; `enqueue` runs it without waiting (CUDA
    timing). Where `prepares` is true, `prepare()` must run before each call, outside the timed
    region (the meters here do): it gives the call fresh logits (`writes_logits_per_call`).
    """

    def __init__(
        self, case: Case, problem: Problem, impl: Implementation | None, loss_fn: LossFn | None = None
    ):
        self.device = problem.logits.device
        self.prepares = writes_logits_per_call(impl, self.device)
        self.source = problem  # its logits are never written: each call's fresh logits copy them
        if impl is not None and impl.overwrites_logits:
            problem = problem.copy()  # without `prepares`, later runs see the gradient as logits: same work
        self.case, self.problem = case, problem
        if impl is None:
            if case.implementation == FLOOR:
                self.buffer = torch.empty_like(problem.logits, requires_grad=False)
            self._step = {FLOOR: TimedPass._floor, FLOOR_ALLOC: TimedPass._floor_alloc}[case.implementation]
            return
        self.loss_fn = loss_fn or impl.loss
        self._choose_pass()

    def _choose_pass(self) -> None:
        """The step of the case's pass; for backward, the graph it runs through, built now (untimed).
        Functions, not bound methods: a pass holding its own method would be a reference cycle, its
        tensors freed only by the garbage collector."""
        self._step = {
            "forward": TimedPass._forward,
            "backward": TimedPass._backward,
            "forward+backward": TimedPass._both,
        }[self.case.pass_]
        if self.case.pass_ == "backward":
            self.loss = self._loss()

    def _differentiated(self) -> tuple[torch.Tensor, ...]:
        """The inputs whose gradients a pass returns."""
        return (self.problem.logits,)

    def prepare(self) -> None:
        """Fresh logits for the next call (where `prepares`): the last call's, which hold a gradient, go
        first, so that two copies never coexist; a new clone of the pristine leaf, so that no call's
        autograd history reaches the next."""
        if self.prepares:
            self.problem.logits = None
            self.problem = self.source.copy()

    def _loss(self) -> torch.Tensor:
        problem = self.problem
        return self.loss_fn(problem.logits, problem.target, self.case.smoothing, "mean", **problem.options)

    def _floor(self):
        with torch.no_grad():
            return torch.exp(self.problem.logits, out=self.buffer)

    def _floor_alloc(self):
        with torch.no_grad():
            return torch.exp(self.problem.logits)

    def _forward(self):
        return self._loss()

    def _backward(self):
        return torch.autograd.grad(self.loss, self._differentiated(), retain_graph=True)

    def _both(self):
        return torch.autograd.grad(self._loss(), self._differentiated())

    def enqueue(self):
        """The pass, without waiting for the device."""
        return self._step(self)

    def __call__(self):
        out = self._step(self)
        synchronize(self.device)
        return out


def prepare_if_asked(fn: Callable[[], object]) -> None:
    """Run `fn.prepare()` where `fn` asks for it (a `TimedPass` with `prepares`); never timed."""
    if getattr(fn, "prepares", False):
        fn.prepare()
