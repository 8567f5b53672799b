"""What the asv suite and the pytest-benchmark suite measure: implementations, passes and sizes.

Plain data, no import of torch or lsr. asv imports today's benchmark files against every old
commit's installed package and names a result by the index of its parameters, so the parameters
must be the same in every process whatever the package holds: they are fixed here, never read from
the package (an implementation a commit lacks is skipped at that commit).

    LSR_ASV_PROFILE=fast|full|dry-run     # the sizes (default: fast)
    LSR_ASV_DEVICE=cpu|cuda               # the device (default: cpu)
"""

import os

# Every loss the registry has held, in the order it gained them; a newly registered one is appended
# (tests/test_history.py checks that none is missing).
IMPLEMENTATIONS = (
    "native",
    "dense",
    "sparse",
    "fused-exact",
    "fused-sparse",
    "fused-exact-inplace",
    "native-compiled",
    "liger",
    "fused-exact-onepass",
    "fused-sparse-onepass",
)
PASSES = ("forward", "backward", "forward+backward")
SMOOTHING = 0.1
IGNORE_INDEX = -100

# fast (the default): what a training step runs, forward+backward, at 4 sizes: `asv run` of one
# commit in under 5 minutes on a 2-core CPU. full: every pass at the CPU sweep's float32 sizes.
PROFILES = {
    "fast": {"passes": ("forward+backward",), "batches": (512, 4096), "classes": (1000, 10000)},
    "full": {"passes": PASSES, "batches": (256, 1024, 4096), "classes": (100, 1000, 10000, 32768)},
    # benchmarks/gpu/run.sh --dry-run: the suite's plumbing in seconds, not a measurement
    "dry-run": {"passes": ("forward+backward",), "batches": (64,), "classes": (100,)},
}
# The LM head losses (lsr.heads; LSR head cases), forward+backward: fast, one shape (the part-1 head at
# H 256); full, the CPU head preset's float32 tokens (lsr.bench.sweep.grid.HEAD_PRESETS).
HEAD_IMPLEMENTATIONS = (
    "head-exact",
    "head-sparse",
    "materialised",
    "materialised-compiled",
    "compiled-autochunk",
    "torch-linear-ce",
    "torch-linear-ce-chunked",
    "liger-flce",
    "cce",
    "cce-torch-compile",
)
HEAD_SMOOTHINGS = (0.0, 0.1)
HEAD_PROFILES = {
    "fast": {"tokens": (1024,), "hidden": (256,), "vocab": (32000,)},
    "full": {"tokens": (512, 2048, 8192), "hidden": (256,), "vocab": (32000,)},
    "dry-run": {"tokens": (64,), "hidden": (64,), "vocab": (1001,)},
}
PROFILE_VARIABLE = "LSR_ASV_PROFILE"
DEVICE_VARIABLE = "LSR_ASV_DEVICE"


def profile() -> dict:
    """The passes and sizes of the profile $LSR_ASV_PROFILE (default: fast)."""
    name = os.environ.get(PROFILE_VARIABLE) or "fast"
    if name not in PROFILES:
        raise ValueError(f"unknown {PROFILE_VARIABLE} {name!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[name]


def head_profile() -> dict:
    """The head losses' sizes of the profile $LSR_ASV_PROFILE (default: fast)."""
    profile()  # the same name check
    return HEAD_PROFILES[os.environ.get(PROFILE_VARIABLE) or "fast"]


def device() -> str:
    """$LSR_ASV_DEVICE (default: cpu)."""
    return os.environ.get(DEVICE_VARIABLE) or "cpu"
