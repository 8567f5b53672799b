#!/usr/bin/env bash
# The GPU run: one prepared command for a lent GPU (one H100 or H200), inside 9.5 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu/run.sh             # on the GPU machine
#   OUT=/tmp/gpu_dry PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh --dry-run   # plumbing, on CPU
#
# Phases, each under its own `timeout` (a phase cut short keeps what it wrote, and the next starts):
#   1. tests (2 min): tests/test_cuda.py and the cuda cases of the device-parametrised loss tests
#   2. sweep (4.5 min): `lsr-bench run --preset full --device cuda`, rows written as they come
#   3. head (1.5 min): `lsr-bench run --preset head --device cuda` (the LM head losses, bfloat16,
#      H 4096), into head/cuda/, its log appended to sweep.log
#   4. bench (1 min): the pytest-benchmark suite, CUDA cases only
#   5. charts (30 s): the sweeps' summaries, then their charts, packed into one archive
# Everything lands under $OUT, at most 8 files (what the device tool brings back):
#   run.log  tests.log  sweep.log  results/cuda/results.csv  results/cuda/metadata.json
#   bench.log  bench.json  charts.tar.gz (results/README.md, the summary, results/<device>/*.png,
#   the charts, and the head sweep's folder head/<device>/ with its results.csv, metadata.json and
#   charts, and head/README.md: `tar -xzf charts.tar.gz` in $OUT puts them in place)
#
# The machine's own python3 (torch 2.11.0+cu130, Triton 3.6.0, pytest, pytest-benchmark, matplotlib,
# psutil, tqdm; no network): `src` goes on PYTHONPATH, nothing is installed, except wheels brought in
# .whl/ (pip --target, no index). Liger-Kernel (the `liger` peer) is not on those machines; to measure
# it, before the run, in the checkout's root on a machine with pip:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5     # 0.9 MB, pure Python
# and call the device tool with carry [".whl"]. Without it the liger rows are absent (not available).
#
# --dry-run: the same phases on tiny CPU sizes (preset gpu-dry-run, suite profile dry-run), with the
# CUDA tests skipped, to test this script where there is no GPU. Its numbers mean nothing.
set -u -o pipefail

cd "$(dirname "$0")/../.."
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: OUT=DIR bash benchmarks/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the output directory}"
PY=${PYTHON:-python3}
BUDGET=${LSR_GPU_RUN_BUDGET:-540}  # seconds for all phases (each may overrun by its 10 s of grace): inside 9.5 minutes
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"

export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels on the GPU (tests/conftest.py would set 1 otherwise)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

exec 3>&2  # the script's own stderr: progress lines go there and to run.log, whatever a phase redirects
say() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG" >&3; }

# phase NAME SECONDS RESERVE COMMAND...: COMMAND under `timeout`, capped by what is left of BUDGET
# once RESERVE seconds are kept for the phases after it; SIGINT first (the sweep then keeps its rows
# and releases its lock), SIGKILL 10 s later.
phase() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local left=$((BUDGET - reserve - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        say "$name: skipped, the run's time is spent"
        return 0
    fi
    say "$name: start (at most ${limit}s)"
    local start=$SECONDS status
    timeout -s INT -k 10 "$limit" "$@"
    status=$?
    local verdict="exit $status"
    if ((status == 124 || status == 130 || status == 137)); then
        verdict="cut at its time limit (exit $status)"  # what it wrote so far stays; not a failure
    elif ((status != 0 && status != ${ALLOW_EXIT:-0})); then
        FAILED+=("$name (exit $status)")
    fi
    say "$name: $verdict after $((SECONDS - start))s"
    return 0  # the phases after it still run
}
FAILED=()

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lsr-site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="/tmp/lsr-site:$PYTHONPATH"
        say "wheels installed from .whl/: $(cd .whl && echo *.whl)"
    else
        say "wheels in .whl/ failed to install (see above); going on without them"
    fi
fi

# Nothing runs without a python that imports torch and this checkout's lsr: say so and stop at once
if ! "$PY" -c "import torch, lsr" >>"$LOG" 2>&1; then
    say "failed: $PY cannot import torch and lsr (see $LOG); set PYTHON= to one that can, e.g. PYTHON=.venv/bin/python"
    exit 3
fi

if ((DRY_RUN)); then
    DEVICE=cpu PRESET=gpu-dry-run HEAD_PRESET=head-dry-run PROFILE=dry-run MIN_TIME=0.01
else
    DEVICE=cuda PRESET=full HEAD_PRESET=head PROFILE=fast MIN_TIME=0.05
fi
say "gpu run: dry_run=$DRY_RUN device=$DEVICE preset=$PRESET min_time=$MIN_TIME out=$OUT"
{
    git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no 2>/dev/null | head -20
    nvidia-smi 2>&1 | head -20
    "$PY" - <<'EOF'
import importlib.util, platform
import torch
import lsr
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "liger_kernel", "pytest_benchmark", "matplotlib"):
    print(name, "importable" if importlib.util.find_spec(name) else "MISSING")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, props.total_memory, "bytes, L2", getattr(props, "L2_cache_size", "?"))
print("runs on cuda:", {i.name: i.runs_on("cuda") for i in lsr.REGISTRY.values()})
EOF
} >>"$LOG" 2>&1

# 1. tests: the CUDA-only tests and the CUDA timing plumbing first, then the device-parametrised loss tests.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs -o addopts="" --durations=10)
{
    phase "tests: test_cuda.py" 60 330 "${PYTEST[@]}" tests/test_cuda.py tests/test_measure.py -k cuda
    # exit 5 (no test collected) is a CPU dry run's: there are no cuda cases there
    ALLOW_EXIT=$((DRY_RUN ? 5 : 0)) phase "tests: cuda cases of the loss tests" $((120 - SECONDS)) 330 \
        "${PYTEST[@]}" tests/test_fused.py tests/test_losses.py -k cuda
} >"$OUT/tests.log" 2>&1

# 2. the sweep: rows are written to results.csv as each case is measured.
phase "sweep: preset $PRESET on $DEVICE" 270 180 \
    "$PY" -m lsr.bench run --preset "$PRESET" --device "$DEVICE" --out "$OUT/results" \
    --min-time "$MIN_TIME" --no-plot --no-progress >"$OUT/sweep.log" 2>&1
rm -f "$OUT/results/$DEVICE/.lsr-bench.lock"  # left only by a sweep killed outright

# 3. the LM head losses: their own results folder, rows as they come
phase "head: preset $HEAD_PRESET on $DEVICE" 90 90 \
    "$PY" -m lsr.bench run --preset "$HEAD_PRESET" --device "$DEVICE" --out "$OUT/head" \
    --min-time "$MIN_TIME" --no-plot --no-progress >>"$OUT/sweep.log" 2>&1
rm -f "$OUT/head/$DEVICE/.lsr-bench.lock"

# 4. the pytest-benchmark suite, this device's cases only (its JSON is written when it ends).
phase "bench: pytest-benchmark, $DEVICE cases" 60 30 \
    env LSR_ASV_PROFILE="$PROFILE" LSR_ASV_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    benchmarks/pytest_suite -k "$DEVICE" --benchmark-json="$OUT/bench.json" \
    --benchmark-max-time=0.05 --benchmark-min-rounds=3 --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name >"$OUT/bench.log" 2>&1

# 5. the summary (results/README.md) at once, then the charts beside the results and the summary
# again with their links, packed into one archive with their paths (results/<device>/*.png), so that
# $OUT keeps to 8 files. All of it can be redrawn anywhere from results.csv and metadata.json:
#   lsr-bench plot results/cuda --summary results
if [ -f "$OUT/results/$DEVICE/results.csv" ]; then
    phase "summary" 15 25 "$PY" -c 'import sys, pathlib; from lsr.bench.report.summary import write_summary
print(write_summary(pathlib.Path(sys.argv[1])))' "$OUT/results" >>"$LOG" 2>&1
    phase "charts" 30 0 "$PY" -m lsr.bench plot "$OUT/results/$DEVICE" --summary "$OUT/results" >>"$LOG" 2>&1
    if [ -f "$OUT/head/$DEVICE/results.csv" ]; then
        phase "head charts" 20 0 "$PY" -m lsr.bench plot "$OUT/head/$DEVICE" --summary "$OUT/head" >>"$LOG" 2>&1
    fi
    (
        cd "$OUT" || exit
        mapfile -t made < <(find results head -name '*.png' -o -name README.md -o -path 'head/*' -type f 2>/dev/null | sort -u)
        if ((${#made[@]})); then
            tar -czf charts.tar.gz "${made[@]}" && rm -f "${made[@]}"
        fi
    )
else
    say "charts: skipped, no results.csv"
fi
say "done: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
if ((${#FAILED[@]})); then
    say "failed phases: ${FAILED[*]} (see their logs in $OUT)"
    exit 1
fi
