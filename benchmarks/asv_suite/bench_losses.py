"""asv suite: time of each pass and its peak allocated bytes, over lsr.bench.grid.SUITE.

A thin adapter: cases, inputs, passes and the memory meter all come from `lsr.bench`, and a
(implementation, pass) pair runs here exactly when the grid has that case (an in-place
implementation has no backward-only pass, for example). asv's own `peakmem_` is the process's peak
RSS (about 670 MB after `import torch`), which hides a loss's few MB, so memory is tracked with
`track_` benchmarks of allocated bytes. Every timed call synchronises the device before it
returns, so asv's wall-clock timer is right on GPUs too.
"""

from lsr.bench import measure
from lsr.bench.grid import FLOOR, SUITE, Case

CASES = {case.key() for case in SUITE.cases()}


class _Pass:
    """One pass of one implementation; subclasses name the pass."""

    pass_name = ""
    params = (SUITE.implementations, SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["implementation", "device", "batch", "classes"]
    timeout = 600
    # Enough samples for a median, bounded so that `asv run` over a few commits stays bearable.
    repeat = (3, 10, 5.0)
    warmup_time = 0.2

    def setup(self, implementation, device, batch, classes):
        case = Case(
            implementation, device, SUITE.dtypes[0], batch, classes, SUITE.smoothings[0], self.pass_name
        )
        if case.key() not in CASES:
            raise NotImplementedError(
                f"the grid has no {self.pass_name} case for {implementation} on {device}"
            )
        self.run = measure.Pass(case, measure.Problem.make(case))

    def peak(self):
        return measure.peak_bytes(self.run, self.run.device)


class Forward(_Pass):
    pass_name = "forward"

    def time_forward(self, *_):
        self.run()

    def track_peak_bytes_forward(self, *_):
        return self.peak()

    track_peak_bytes_forward.unit = "bytes"


class Backward(_Pass):
    pass_name = "backward"

    def time_backward(self, *_):
        self.run()

    def track_peak_bytes_backward(self, *_):
        return self.peak()

    track_peak_bytes_backward.unit = "bytes"


class ForwardBackward(_Pass):
    pass_name = "forward+backward"

    def time_forward_backward(self, *_):
        self.run()

    def track_peak_bytes_forward_backward(self, *_):
        return self.peak()

    track_peak_bytes_forward_backward.unit = "bytes"


class Floor:
    """torch.exp(z, out=buf) on the same logits: the reference every implementation is a multiple of."""

    params = (SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["device", "batch", "classes"]

    def setup(self, device, batch, classes):
        case = Case(FLOOR, device, SUITE.dtypes[0], batch, classes, SUITE.smoothings[0], "forward+backward")
        self.floor = measure.Pass(case, measure.Problem.make(case))

    def time_floor(self, *_):
        self.floor()
