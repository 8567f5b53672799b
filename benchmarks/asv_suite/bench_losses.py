"""asv suite: time of each pass and its peak allocated bytes, over lsr.bench.grid.SUITE.

A thin adapter: cases, inputs, passes and the memory meter all come from `lsr.bench`. asv's own
`peakmem_` is the process's peak RSS (about 670 MB after `import torch`), which hides a loss's few
MB, so memory is tracked with `track_` benchmarks of allocated bytes instead. Every timed call
synchronises the device before it returns, so asv's wall-clock timer is right on GPUs too.
"""

import lsr
from lsr.bench import measure
from lsr.bench.grid import FLOOR, SUITE, Case


class _Passes:
    params = (SUITE.implementations, SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["implementation", "device", "batch", "classes"]
    timeout = 600
    # Enough samples for a median, bounded so that `asv run` over a few commits takes minutes.
    repeat = (3, 10, 5.0)
    warmup_time = 0.2

    def setup(self, implementation, device, batch, classes):
        impl = lsr.get(implementation)
        if not impl.runs_on(device) or classes < impl.min_classes:
            raise NotImplementedError(f"{implementation} does not run on {device}")
        first = Case(implementation, device, SUITE.dtypes[0], batch, classes, SUITE.smoothings[0], "forward")
        problem = measure.Problem.make(first)
        self.passes = {
            name: measure.Pass(Case(*first.key()[:-1], name), problem)
            for name in ("forward", "backward", "forward+backward")
        }


class TimeLoss(_Passes):
    def time_forward(self, *_):
        self.passes["forward"]()

    def time_backward(self, *_):
        self.passes["backward"]()

    def time_forward_backward(self, *_):
        self.passes["forward+backward"]()


class PeakMemory(_Passes):
    def track_peak_bytes_forward(self, *_):
        return self._peak("forward")

    def track_peak_bytes_backward(self, *_):
        return self._peak("backward")

    def track_peak_bytes_forward_backward(self, *_):
        return self._peak("forward+backward")

    def _peak(self, name):
        run = self.passes[name]
        return measure.peak_bytes(run, run.device)

    track_peak_bytes_forward.unit = "bytes"
    track_peak_bytes_backward.unit = "bytes"
    track_peak_bytes_forward_backward.unit = "bytes"


class TimeFloor:
    """torch.exp(z, out=buf) on the same logits: the reference every implementation is a multiple of."""

    params = (SUITE.devices, SUITE.batches, SUITE.classes)
    param_names = ["device", "batch", "classes"]

    def setup(self, device, batch, classes):
        case = Case(FLOOR, device, SUITE.dtypes[0], batch, classes, SUITE.smoothings[0], "forward+backward")
        self.floor = measure.Pass(case, measure.Problem.make(case))

    def time_floor(self, *_):
        self.floor()
