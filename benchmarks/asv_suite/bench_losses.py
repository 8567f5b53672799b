"""asv suite: time and peak allocated bytes of each loss and pass, over the suite grid of lsr.bench.grid.

    LSR_ASV_PROFILE=fast|full asv run ...      # the grid's profile (default: fast)

A thin adapter: cases, inputs, passes and the memory meter all come from `lsr.bench`, and an
(implementation, pass) pair runs here exactly when the grid has that case (an in-place
implementation has no backward-only pass, for example). asv's own `peakmem_` is the process's peak
RSS (about 670 MB after `import torch`), which hides a loss's few MB, so memory is tracked with a
`track_` benchmark of allocated bytes. Every timed call synchronises the device before it returns,
so asv's wall-clock timer is right on GPUs too.
"""

import lsr
from lsr.bench import grid, measure
from lsr.bench.results import FLOOR, Case

SUITE = grid.suite()
CASES = {case.key() for case in SUITE.cases()}


class _Measured:
    """What every benchmark class shares: asv's sampling settings, and time and memory of `self.run`."""

    timeout = 600
    # Enough samples for a median, bounded so that `asv run` over a few commits stays bearable.
    repeat = (3, 10, 5.0)
    warmup_time = 0.2

    def prepare(self, case: Case) -> None:
        if case.key() not in CASES:
            raise NotImplementedError(f"the grid has no {case.pass_} case for {case.implementation}")
        impl = None if case.is_floor else lsr.get(case.implementation)
        self.run = measure.Pass(case, measure.Problem.make(case), impl)

    def time_call(self, *_):
        self.run()

    def track_peak_bytes(self, *_):
        return measure.peak_bytes(self.run, self.run.device)

    track_peak_bytes.unit = "bytes"


class Loss(_Measured):
    """One pass (forward, backward, or both) of one implementation."""

    params = (SUITE.implementations, SUITE.passes, SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["implementation", "pass", "device", "batch", "classes"]

    def setup(self, implementation, pass_, device, batch, classes):
        smoothing, dtype = SUITE.smoothings[0], SUITE.dtypes[0]
        self.prepare(Case(implementation, device, dtype, batch, classes, smoothing, pass_))


class Floor(_Measured):
    """torch.exp(z, out=buf) on the same logits: the reference every implementation is a multiple of."""

    params = (SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["device", "batch", "classes"]

    def setup(self, device, batch, classes):
        smoothing, dtype = SUITE.smoothings[0], SUITE.dtypes[0]
        self.prepare(Case(FLOOR, device, dtype, batch, classes, smoothing, "forward+backward"))
