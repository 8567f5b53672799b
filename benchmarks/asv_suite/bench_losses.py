"""asv suite: time and peak allocated bytes of each loss and pass, and the floor, over commits.

    asv run HEAD^!                       # one commit; LSR_ASV_PROFILE=full for the larger sizes

asv imports this file against each old commit's installed package, so it uses only the package's
public API (`lsr.REGISTRY`, `Implementation.loss`, `runs_on`, the in-place flags read with getattr),
which holds from the first commit, and measures memory with its own small meter. Its parameters
come from profiles.py, never from the package (see there).

Where `asv run`'s time went, and what keeps it short (measured in the README's asv section):
- asv runs every (benchmark, parameters, round) in a process of its own. With asv.conf.json's
  `launch_method: forkserver` they are forks of one server that has imported torch and, below,
  compiled the fused CPU kernels once: `import torch` and compilation are not paid per process.
  The server compiles with one thread: a fork of a process whose OpenMP pool has started hangs
  in its first parallel region (GNU libgomp); the forks run with the usual thread count.
- inductor's on-disk caches live in one directory that every asv process and commit shares.
- asv re-runs `setup` before every timed sample; the inputs are made once per process and setup
  only hands them out (fresh logits for a loss that overwrites them, untimed).
"""

import os
import sys
import warnings
from pathlib import Path

# Before torch is imported: one inductor cache for every process, compilation in-process (a worker
# pool would start a Python per process and leave threads behind at the fork).
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".asv" / "inductor")
)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import lsr  # noqa: E402

from .profiles import (  # noqa: E402
    HEAD_IMPLEMENTATIONS,
    HEAD_SMOOTHINGS,
    IGNORE_INDEX,
    IMPLEMENTATIONS,
    SMOOTHING,
    device,
    head_profile,
    profile,
)

DEVICE = device()
PROFILE = profile()
HEAD_PROFILE = head_profile()


def _flag(impl, name: str) -> bool:
    """An Implementation flag; False at commits from before it existed."""
    return bool(getattr(impl, name, False))


def _unsupported(name: str, pass_: str, classes: int) -> str | None:
    """Why this commit's package cannot run (name, pass_) here, or None."""
    impl = lsr.REGISTRY.get(name)
    if impl is None:
        return f"{name} is not registered at this commit"
    if not impl.runs_on(DEVICE):
        return f"{name} does not run on {DEVICE} here"
    if classes < impl.min_classes:
        return f"{name} needs {impl.min_classes} classes"
    repeatable = getattr(impl, "repeatable_backward", True)
    writes_logits = _flag(impl, "inplace_backward") or _flag(impl, "gradient_in_forward")
    if pass_ == "backward" and (writes_logits or not repeatable):
        return f"{name}'s backward cannot run twice through one graph"
    return None


_inputs: dict = {}


def _inputs_of(batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (std 2, never zeros) and targets for one size, made once per process."""
    if (batch, classes) not in _inputs:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(batch, classes, generator=gen) * 2.0
        target = torch.randint(0, classes, (batch,), generator=gen)
        _inputs[batch, classes] = (logits.to(DEVICE), target.to(DEVICE))
    return _inputs[batch, classes]


def _synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


class _Pass:
    """One pass of one loss, as a training step runs it: the gradient is returned, never accumulated.

    forward: the loss with autograd recording; backward: `torch.autograd.grad` of a graph built in
    `prepare` (untimed); forward+backward: both. A loss that writes the gradient into its logits
    gets non-leaf logits of its own (as a layer's output is); `prepare` copies fresh ones in before
    every call, so that each call reads real logits.
    """

    def __init__(self, name: str, pass_: str, batch: int, classes: int):
        self.impl = lsr.REGISTRY[name]
        self.pass_ = pass_
        self.logits, self.target = _inputs_of(batch, classes)
        self.writes_logits = _flag(self.impl, "inplace_backward") or _flag(self.impl, "gradient_in_forward")
        self.leaf = self.logits.clone().requires_grad_(True)
        self.z = self.leaf.clone() if self.writes_logits else self.leaf
        self.prepare()

    def loss(self) -> torch.Tensor:
        return self.impl.loss(self.z, self.target, SMOOTHING, "mean", ignore_index=IGNORE_INDEX)

    def prepare(self) -> None:
        if self.writes_logits:
            with torch.no_grad():
                self.z.copy_(self.logits)
        if self.pass_ == "backward":
            self.graph = self.loss()
        _synchronize()

    def __call__(self):
        if self.pass_ == "forward":
            out = self.loss()
        elif self.pass_ == "backward":
            out = torch.autograd.grad(self.graph, self.z, retain_graph=True)
        else:
            out = torch.autograd.grad(self.loss(), self.z)
        _synchronize()
        return out


def _peak_bytes(fn) -> int:
    """Peak bytes allocated above the start while `fn` runs, its result included.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of the profiler's allocation and
    free events in time order (frees of older tensors count negative), its exact twin.
    """
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    saved = os.dup(2)  # the profiler's C++ side prints start/stop lines to fd 2
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    del result
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def _warm_up() -> None:
    """Compile every loss this commit has, once, in asv's fork server (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool before the fork
    try:
        batch, classes = min(PROFILE["batches"]), min(PROFILE["classes"])
        for name in IMPLEMENTATIONS:
            for pass_ in PROFILE["passes"]:
                if _unsupported(name, pass_, classes) is None:
                    run = _Pass(name, pass_, batch, classes)
                    run()
                    run.prepare()
                    run()
    finally:
        torch.set_num_threads(threads)


if sys.argv[1:2] == ["run_server"] and DEVICE == "cpu":  # asv's fork server (launch_method forkserver)
    _warm_up()


class Loss:
    """Forward, backward, or both, of each loss: time and peak allocated bytes.

    asv's `peakmem_` is the process's peak RSS (about 670 MB after `import torch`), which hides a
    loss's few MB: memory is `track_peak_bytes`, bytes allocated above the inputs.
    """

    params = (
        list(IMPLEMENTATIONS),
        list(PROFILE["passes"]),
        list(PROFILE["batches"]),
        list(PROFILE["classes"]),
    )
    param_names = ["implementation", "pass", "batch", "classes"]  # asv shows "batch-512; classes-1000"
    timeout = 600
    # Up to 10 samples in at most 5 s a round, 2 rounds in separate processes (asv's default).
    repeat = (3, 10, 5.0)
    rounds = 2
    warmup_time = 0.2

    def setup(self, name, pass_, batch, classes):
        # asv re-runs setup before each timed call: the pass is made once per process.
        run = getattr(self, "run", None)
        if run is None:
            reason = _unsupported(name, pass_, classes)
            if reason is not None:
                raise NotImplementedError(reason)
            run = self.run = _Pass(name, pass_, batch, classes)
        run.prepare()

    def time_pass(self, *_):
        self.run()

    def track_peak_bytes(self, *_):
        return _peak_bytes(self.run)

    track_peak_bytes.unit = "bytes"


class Floor:
    """torch.exp(z, out=buf) on the same logits: one read and one write of them, the reference
    every loss's time is a multiple of."""

    params = (list(PROFILE["batches"]), list(PROFILE["classes"]))
    param_names = ["batch", "classes"]
    repeat = Loss.repeat
    rounds = Loss.rounds
    warmup_time = Loss.warmup_time

    def setup(self, batch, classes):
        self.logits, _ = _inputs_of(batch, classes)
        if getattr(self, "out", None) is None:  # asv re-runs setup before each timed call
            self.out = torch.empty_like(self.logits)

    def time_exp(self, *_):
        torch.exp(self.logits, out=self.out)
        _synchronize()


# --- the LM head losses (lsr.heads, from the commit that added them) ------------------------------------


def _head_registry() -> dict:
    try:
        import lsr.heads  # noqa: F401 - lsr.heads below
    except ImportError:  # a commit from before the head losses
        return {}
    return lsr.heads.HEAD_REGISTRY


def _head_inputs(tokens: int, hidden: int, vocab: int):
    """Hidden states N(0, 1), an lm_weight N(0, 4 / H) (logits of std 2, as the logits losses'),
    targets; made once per process."""
    key = ("head", tokens, hidden, vocab)
    if key not in _inputs:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(tokens, hidden, generator=gen)
        w = torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)
        y = torch.randint(0, vocab, (tokens,), generator=gen)
        _inputs[key] = (h.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True), y.to(DEVICE))
    return _inputs[key]


class HeadLoss:
    """Forward+backward of each LM head loss (gradients of hidden and lm_weight returned, never
    accumulated): time and peak allocated bytes above the inputs."""

    params = (
        list(HEAD_IMPLEMENTATIONS),
        list(HEAD_PROFILE["tokens"]),
        list(HEAD_PROFILE["hidden"]),
        list(HEAD_PROFILE["vocab"]),
        list(HEAD_SMOOTHINGS),
    )
    param_names = ["implementation", "tokens", "hidden", "vocab", "smoothing"]
    timeout = 600
    repeat = Loss.repeat
    rounds = Loss.rounds
    warmup_time = Loss.warmup_time

    def setup(self, name, tokens, hidden, vocab, smoothing):
        impl = _head_registry().get(name)
        if impl is None:
            raise NotImplementedError(f"{name} is not a head loss at this commit")
        reason = None if impl.runs_on(DEVICE) else f"{name} does not run on {DEVICE} here"
        if reason or impl.unsupported(smoothing=smoothing):
            raise NotImplementedError(reason or impl.unsupported(smoothing=smoothing))
        self.h, self.w, self.y = _head_inputs(tokens, hidden, vocab)
        self.impl, self.smoothing = impl, smoothing
        # torch's chunked path at smoothing > 0 warns that it falls back (lsr.heads says so): once is enough
        warnings.simplefilter("ignore", getattr(lsr.heads, "TorchFellBack", UserWarning))

    def _step(self):
        loss = self.impl.loss(self.h, self.w, self.y, self.smoothing, "mean", IGNORE_INDEX)
        out = torch.autograd.grad(loss, (self.h, self.w))
        _synchronize()
        return out

    def time_forward_backward(self, *_):
        self._step()

    def track_peak_bytes(self, *_):
        return _peak_bytes(self._step)

    track_peak_bytes.unit = "bytes"


class FloorGemm:
    """The three GEMMs of an LM head alone (logits, d_hidden, d_lm_weight): the head losses' floor."""

    params = HeadLoss.params[1:4]
    param_names = HeadLoss.param_names[1:4]
    repeat = Loss.repeat
    rounds = Loss.rounds
    warmup_time = Loss.warmup_time

    def setup(self, tokens, hidden, vocab):
        self.h, self.w, _ = _head_inputs(tokens, hidden, vocab)

    def time_gemms(self, *_):
        with torch.no_grad():
            z = self.h @ self.w.t()
            z @ self.w, z.t() @ self.h
        _synchronize()
