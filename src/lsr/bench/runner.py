"""Running a sweep: every case gated, timed and metered; failures recorded, rows kept as they come."""

from __future__ import annotations

import gc
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

import lsr
from lsr.bench import measure
from lsr.bench.environment import environment
from lsr.bench.results import (
    FLOOR,
    METADATA_FILE,
    RESULTS_FILE,
    Case,
    case_key,
    new_row,
    read_metadata,
    read_rows,
    write_metadata,
    write_rows,
)
from lsr.types import LossFn


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def base_row(case: Case) -> dict:
    """The row of `case` before anything is measured."""
    return new_row(case, FLOOR if case.is_floor else lsr.get(case.implementation).smoothing_kind)


def failure(error: BaseException, context: str = "") -> dict:
    status = "oom" if is_out_of_memory(error) else "error"
    return {"status": status, "message": f"{context}{type(error).__name__}: {error}".splitlines()[0][:300]}


def measure_case(
    case: Case, problem: measure.Problem, loss_fn: LossFn | None = None, min_time: float = 0.5
) -> dict:
    """One row: gate, time and meter `case`. Never raises for a failing case; the row says what happened."""
    row = base_row(case)
    device = torch.device(case.device)
    impl = None if case.is_floor else lsr.get(case.implementation)
    try:
        if impl is not None:
            row["max_rel_error"] = measure.check_against_reference(case, problem, impl, loss_fn)
        timed = measure.Pass(case, problem, impl, loss_fn)
        timing = measure.time_pass(timed, min_time=min_time)
        row.update(median_s=timing.median, iqr_s=timing.iqr, runs=timing.runs, threads=timing.threads)
        row["message"] = timing.warning or ""
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


def run_sweep(
    cases: Iterable[Case],
    out_dir: Path,
    *,
    resume: bool = False,
    preset: str | None = None,
    logit_std: float = 2.0,
    min_time: float = 0.5,
    loss_fns: dict[str, LossFn] | None = None,
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
    metadata = environment(devices[0] if len(devices) == 1 else ",".join(devices), preset=preset)
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
    done = {case_key(r) for r in rows}
    todo = [case for case in cases if case.key() not in done]
    write_metadata(out_dir / METADATA_FILE, metadata)

    bar = tqdm(total=len(todo), disable=not progress, unit="case", dynamic_ncols=True)
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
        bar.set_postfix_str(
            f"{case.implementation} {case.pass_} N={case.batch} C={case.classes} {case.dtype}"
        )
        bar.update()
    bar.close()
    return rows
