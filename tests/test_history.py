"""The asv history: the chart read from asv's result files, the suite's fixed parameters, the machine,
and `asv check` on the suite."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import lsr
from lsr.bench import history

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["result", "params", "version", "started_at", "duration"]
PARAMS = [["'native'", "'fused-exact'"], ["'forward+backward'"], ["512", "4096"], ["1000"]]


def _write_result(
    machine_dir: Path, commit: str, date_ms: int, times: list, peaks: list, floor: list
) -> None:
    """One commit's file as asv writes it (api version 2): a result per parameter combination, null
    where the case failed or was skipped."""
    data = {
        "commit_hash": commit,
        "env_name": "virtualenv-py3.11-torch2.13.0",
        "date": date_ms,
        "params": {"machine": machine_dir.name, "python": "3.11", "torch": "2.13.0"},
        "python": "3.11",
        "requirements": {"torch": "2.13.0"},
        "env_vars": {},
        "result_columns": COLUMNS,
        "results": {
            history.TIME: [times, PARAMS, "v", 0, 1.0],
            history.PEAK: [peaks, PARAMS, "v", 0, 1.0],
            history.FLOOR_TIME: [floor, [["512", "4096"], ["1000"]], "v", 0, 1.0],
        },
        "durations": {},
        "version": 2,
    }
    (machine_dir / f"{commit[:8]}-virtualenv-py3.11-torch2.13.0.json").write_text(json.dumps(data))


@pytest.fixture
def results_dir(tmp_path):
    """Three commits whose file names sort against their dates, one of them before fused-exact existed
    (null) and one with a failed native case (NaN)."""
    machine = tmp_path / "asv" / "epyc-2c-avx2"
    machine.mkdir(parents=True)
    (machine / "machine.json").write_text(
        json.dumps({"machine": "epyc-2c-avx2", "cpu": "AMD EPYC (avx2, 2 logical cores)", "version": 1})
    )
    day = 86_400_000
    _write_result(machine, "c" * 40, 3 * day, [1e-3, 4e-3, 5e-4, 2e-3], [2e6, 16e6, 2e6, 8e6], [2e-4, 1e-3])
    _write_result(machine, "a" * 40, 1 * day, [1e-3, 4e-3, None, None], [2e6, 16e6, None, None], [2e-4, 1e-3])
    _write_result(
        machine, "b" * 40, 2 * day, [float("nan"), 4e-3, 6e-4, 2e-3], [None, 16e6, 2e6, 8e6], [2e-4, 1e-3]
    )
    return tmp_path / "asv"


def test_history_orders_commits_by_date_and_skips_missing_values(results_dir):
    (commits,) = history.load_history(results_dir).values()
    assert [c.hash[0] for c in commits] == ["a", "b", "c"]
    assert commits[0].values[history.TIME] == {
        ("native", "forward+backward", "512", "1000"): 1e-3,
        ("native", "forward+backward", "4096", "1000"): 4e-3,
    }
    assert ("native", "forward+backward", "512", "1000") not in commits[1].values[history.TIME]  # NaN
    assert commits[2].values[history.PEAK][("fused-exact", "forward+backward", "4096", "1000")] == 8e6
    assert commits[2].values[history.FLOOR_TIME][("4096", "1000")] == 1e-3
    assert commits[1].label == "bbbbbbb 01-03 00:00"
    assert commits[0].environment["torch"] == "2.13.0"


def test_history_chart_draws(results_dir, tmp_path):
    (png,) = history.draw(results_dir, tmp_path / "charts")
    assert png.name == "epyc-2c-avx2_cpu_float32.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def test_history_cli_says_when_there_is_nothing_to_draw(tmp_path, capsys):
    (tmp_path / "empty" / "some-machine").mkdir(parents=True)
    assert history.main(["chart", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "no forward+backward results" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no asv results directory"):
        history.load_history(tmp_path / "missing")


def test_asv_machine_arguments_name_the_kind_and_isa():
    arguments = history.machine_arguments()
    name = arguments[arguments.index("--machine") + 1]
    assert re.fullmatch(r"[a-z0-9]+-[0-9]+c-[a-z0-9_]+", name)
    assert arguments[-1] == "--yes" and "--cpu" in arguments and "--num_cpu" in arguments


def test_asv_suite_lists_every_registered_implementation():
    """asv's parameters are fixed in profiles.py (not read from the package): a newly registered
    implementation must be added there, or asv never measures it."""
    spec = importlib.util.spec_from_file_location(
        "profiles", ROOT / "benchmarks" / "asv_suite" / "profiles.py"
    )
    profiles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profiles)
    assert set(lsr.REGISTRY) <= set(profiles.IMPLEMENTATIONS)
    assert len(set(profiles.IMPLEMENTATIONS)) == len(profiles.IMPLEMENTATIONS)


def _pytest_benchmark_file(path: Path, machine_info: dict, extra_info: dict, run: dict | None) -> Path:
    from lsr.bench.data import CASE_DEFAULTS

    case = CASE_DEFAULTS | {
        "implementation": "native",
        "smoothing_kind": "exact",
        "device": "cpu",
        "dtype": "float32",
        "batch": 512,
        "classes": 1000,
        "smoothing": 0.1,
        "pass": "forward+backward",
    }
    stats = {"median": 1.5e-3, "iqr": 1e-4, "rounds": 20, "iterations": 1}
    bench = {"name": "test_loss[native]", "stats": stats, "extra_info": {"case": case} | extra_info}
    data = {"machine_info": machine_info, "benchmarks": [bench]} | ({"lsr_run": run} if run else {})
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "machine_info, extra_info, run",
    [
        # saved by the conftest before it stored lsr.bench.measure.machine's dictionary: top-level keys
        ({"torch_threads": 3, "torch_version": "2.13.0", "cpu": {"brand_raw": "AMD EPYC"}}, {}, None),
        # today's conftest: machine and software in machine_info["lsr"], per-run fields in "lsr_run"
        (
            {"lsr": {"threads": 3, "torch_version": "2.13.0", "device_name": "AMD EPYC"}},
            {"threads": 3},
            {"load_average_1min": 0.25},
        ),
    ],
)
def test_pytest_benchmark_runs_say_their_threads(tmp_path, machine_info, extra_info, run):
    from lsr.bench import data as results
    from lsr.bench.report import style

    path = _pytest_benchmark_file(tmp_path / "run.json", machine_info, extra_info, run)
    rows, metadata = results.load(path)
    assert rows[0]["threads"] == 3 and rows[0]["median_s"] == 1.5e-3
    assert "AMD EPYC · torch 2.13.0 · 3 threads" in style.title("time", metadata)
    assert metadata.get("load_average_1min") == (run or {}).get("load_average_1min")


def test_asv_check():
    if shutil.which("asv") is None:
        pytest.skip("asv is not installed (extra: benchmarking)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["asv", "check", "--python=same"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "No problems found" in result.stdout, result.stdout + result.stderr
