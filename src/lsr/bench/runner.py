"""Running a sweep: every case gated, timed and metered; failures recorded, rows kept as they come."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import lsr
from lsr.bench import measure
from lsr.bench.grid import DTYPES, FLOOR, Case
from lsr.bench.results import (
    COLUMNS,
    METADATA_FILE,
    RESULTS_FILE,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    if device == "mps":
        return "Apple MPS"
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str, preset: str | None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "lsr_version": lsr.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "command": " ".join(["lsr-bench", *sys.argv[1:]]) if sys.argv and "lsr" in sys.argv[0] else None,
    }


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def base_row(case: Case) -> dict:
    """The columns a row has before anything is measured."""
    kind = FLOOR if case.is_floor else lsr.get(case.implementation).smoothing_kind
    logits_bytes = case.batch * case.classes * DTYPES[case.dtype].itemsize
    return (
        dict.fromkeys(COLUMNS)
        | case.as_dict()
        | {
            "smoothing_kind": kind,
            "logits_bytes": logits_bytes,
            "status": "ok",
            "message": "",
        }
    )


def failure(error: BaseException, context: str = "") -> dict:
    status = "oom" if is_out_of_memory(error) else "error"
    return {"status": status, "message": f"{context}{type(error).__name__}: {error}".splitlines()[0][:300]}


def measure_case(
    case: Case, problem: measure.Problem, loss_fn: Callable | None = None, min_time: float = 0.5
) -> dict:
    """One row: gate, time and meter `case`. Never raises for a failing case; the row says what happened."""
    row = base_row(case)
    device = torch.device(case.device)
    try:
        if not case.is_floor:
            row["max_rel_error"] = measure.check_against_reference(case, problem, loss_fn)
        timed = measure.Pass(case, problem, loss_fn)
        timing = measure.time_pass(timed, min_time=min_time)
        row.update(median_s=timing.median_s, iqr_s=timing.iqr_s, runs=timing.runs, threads=timing.threads)
        row["peak_bytes"] = measure.peak_bytes(timed, device)
        if device.type == "cpu":
            row["peak_rss_bytes"] = measure.peak_rss_bytes(timed)
    except measure.GateFailure as e:
        row["status"], row["message"] = "failed", str(e)
    except Exception as e:  # noqa: BLE001 - a sweep records any failure and goes on
        row.update(failure(e))
    finally:
        timed = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


class Progress:
    """A one-line progress bar with an ETA on stderr."""

    def __init__(self, total: int, stream=sys.stderr, enabled: bool = True):
        self.total, self.done, self.stream, self.enabled = total, 0, stream, enabled
        self.started = time.perf_counter()

    def update(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s, ETA {eta:5.0f}s  {label[:60]:<60}"
        )
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _case_of(row: dict) -> Case:
    return Case(
        *(row[k] for k in ("implementation", "device", "dtype", "batch", "classes", "smoothing", "pass"))
    )


def run_sweep(
    cases: Iterable[Case],
    out_dir: Path,
    *,
    resume: bool = False,
    preset: str | None = None,
    logit_std: float = 2.0,
    min_time: float = 0.5,
    loss_fns: dict[str, Callable] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure `cases` into out_dir/results.csv, rewriting it (atomically) after every row.

    resume: keep the rows already measured ok in out_dir and skip their cases; failed, oom and
    error rows are measured again. Refused when the settings that change numbers (threads, logit
    std, timing budget) differ from the first run's. loss_fns: overrides of the registry's functions
    by name (tests use it to plant a wrong or failing implementation).
    """
    cases = list(cases)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    devices = sorted({case.device for case in cases})
    metadata = environment(devices[0] if len(devices) == 1 else ",".join(devices), preset)
    metadata["settings"] = {"threads": torch.get_num_threads(), "logit_std": logit_std, "min_time": min_time}
    rows = []
    if resume and results_path.exists():
        previous = read_metadata(out_dir)
        if previous.get("settings", metadata["settings"]) != metadata["settings"]:
            raise ValueError(
                f"cannot resume {out_dir}: it was measured with {previous['settings']}, this run uses "
                f"{metadata['settings']}; start afresh in another --out"
            )
        rows = [r for r in read_rows(results_path) if r["status"] == "ok"]
        metadata["resumed"] = [
            *previous.get("resumed", []),
            {k: previous.get(k) for k in ("git_commit", "date")},
        ]
    done = {_case_of(r).key() for r in rows}
    todo = [case for case in cases if case.key() not in done]
    write_metadata(out_dir / METADATA_FILE, metadata)

    bar = Progress(len(todo), enabled=progress)
    problem_key, problem = None, None
    for case in todo:
        key = (case.device, case.dtype, case.batch, case.classes)
        if key != problem_key:  # cases come grouped by size: make each size's logits once
            problem = None
            gc.collect()
            try:
                problem = measure.Problem.make(case, logit_std=logit_std)
                problem_key = key
            except Exception as e:  # noqa: BLE001
                problem_key, problem_error = key, e
        if problem is None:
            row = base_row(case) | failure(problem_error, "making inputs: ")
        else:
            row = measure_case(case, problem, (loss_fns or {}).get(case.implementation), min_time=min_time)
        rows.append(row)
        write_rows(results_path, rows)
        bar.update(f"{case.implementation} {case.pass_} N={case.batch} C={case.classes} {case.dtype}")
    return rows
