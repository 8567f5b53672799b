"""Sweeps sharded over the ranks of a launch (gloo on CPU, the ranks started with the variables torchrun
sets), the output directory's lock shared by one run's ranks only, resume from the parts of an
interrupted sharded run, and the runs of several machines merged, plotted and compared."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lsr
from lsr.bench import cli
from lsr.bench.data import (
    COLUMN_TYPES,
    FLOOR,
    FLOOR_ALLOC,
    FLOORS,
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
from lsr.bench.data.lock import LOCK_FILE, SweepLocked, output_lock, run_lock
from lsr.bench.data.merge import MACHINES, PARTS_DIR, merge_runs
from lsr.bench.measure.machine import machine_name
from lsr.bench.report import plot, style
from lsr.bench.sweep.runner import run_sweep
from lsr.bench.sweep.shard import share

# Two sizes, two implementations, forward+backward: 2 sizes of 4 cases (2 floors, 2 losses).
GRID = ["--device", "cpu", "--impl", "native", "sparse", "--batch", "4", "8", "--classes", "3"]
GRID += ["--pass", "forward+backward", "--dtype", "float32", "--smoothing", "0.1"]
GRID += ["--ignore-fraction", "0", "--weighted", "off", "--min-time", "0.001", "--no-plot", "--no-progress"]
CASES = [
    Case(name, "cpu", "float32", n, 3, 0.1, "forward+backward")
    for n in (4, 8)
    for name in (FLOOR, FLOOR_ALLOC, "native", "sparse")
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(command: list[str], folder: Path, world_size: int = 2) -> list[subprocess.Popen]:
    """`command` started as the ranks of one launch on this host, with the variables torchrun sets;
    each rank's output in folder/rank-K.out and .err."""
    port = str(free_port())
    ranks = []
    for rank in range(world_size):
        env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
        env |= {"LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        out, err = (open(folder / f"rank-{rank}.{kind}", "w") for kind in ("out", "err"))
        ranks.append(subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True))
    return ranks


def wait_all(ranks: list[subprocess.Popen], folder: Path, timeout: float = 120) -> list[str]:
    """Each rank's stderr once all have ended; when one fails, the others are ended, as torchrun does."""
    deadline = time.monotonic() + timeout
    while any(r.poll() is None for r in ranks) and time.monotonic() < deadline:
        if any(r.poll() not in (None, 0) for r in ranks):
            for r in ranks:
                if r.poll() is None:
                    r.terminate()
        time.sleep(0.05)
    for r in ranks:
        if r.poll() is None:
            r.kill()
        r.wait()
    return [(folder / f"rank-{k}.err").read_text() for k in range(len(ranks))]


def rank_rows(part: Path) -> int:
    return len(read_rows(part)) if part.exists() else 0


def outcome(rows: list[dict]) -> list[tuple]:
    return [(case_key(r), r["status"]) for r in rows]


def test_cases_are_shared_by_whole_sizes_and_none_twice():
    sweep = [
        Case(name, "cpu", "float32", n, c, 0.1, "forward")
        for n in (4, 8)
        for c in (3, 5)
        for name in ("floor", "native")
    ]
    shares = [share(sweep, rank, 3) for rank in range(3)]
    assert sorted(map(Case.key, sum(shares, []))) == sorted(map(Case.key, sweep))
    for cases in shares:  # whole sizes, in the sweep's order
        sizes = {(c.batch, c.classes) for c in cases}
        assert len(cases) == 2 * len(sizes) and cases == [c for c in sweep if c in cases]
    assert [len(cases) for cases in shares] == [2, 2, 4]  # the largest sizes first, each to the least work


def test_the_lock_admits_the_ranks_of_one_run_and_refuses_any_other_writer(tmp_path):
    with run_lock(tmp_path, "a1", "rank 0 of 2") as holds:
        with run_lock(tmp_path, "a1", "rank 1 of 2") as also_holds:
            assert holds and not also_holds
        with pytest.raises(SweepLocked, match=r"run a1, rank 0 of 2, pid \d+"):
            run_sweep(CASES[:1], tmp_path, min_time=0.001, progress=False)
        with pytest.raises(SweepLocked, match="run a1"), run_lock(tmp_path, "b2"):
            pass
    with output_lock(tmp_path), pytest.raises(SweepLocked, match=r"writing to .*: pid \d+"):
        with run_lock(tmp_path, "a1"):
            pass
    assert not (tmp_path / LOCK_FILE).exists()


# The first sharded launch: rank 1 hangs in its first sparse case, until interrupted.
HANG_ON_RANK_1 = """
import os, sys, time
from pathlib import Path
from lsr.bench.data import Case
from lsr.bench.sweep.runner import run_sweep
from lsr.bench.sweep.shard import Shard

def hang(input, target, *args, **kwargs):
    print("measuring", flush=True)
    time.sleep(600)

cases = [Case(name, "cpu", "float32", n, 3, 0.1, "forward+backward")
         for n in (4, 8) for name in ("floor", "floor-alloc", "native", "sparse")]
shard = Shard.start()
hang_here = {"sparse": hang} if shard.rank == 1 else {}
run_sweep(cases, Path(sys.argv[1]), loss_fns=hang_here, min_time=0.001, progress=False, shard=shard)
"""


def test_a_sharded_run_interrupted_and_resumed_has_exactly_the_rows_of_the_run_unsharded(tmp_path):
    out = tmp_path / "sharded" / "cpu"
    ranks = start_ranks([sys.executable, "-c", textwrap.dedent(HANG_ON_RANK_1), str(out)], tmp_path)
    assert cli.main(["run", *GRID, "--out", str(tmp_path / "alone")]) == 0  # meanwhile, in this process
    deadline, part_0 = time.monotonic() + 90, out / PARTS_DIR / "rank-0.csv"
    # until rank 1 hangs in its first sparse case and rank 0 has measured its share
    while not ("measuring" in (tmp_path / "rank-1.out").read_text() and rank_rows(part_0) == 4):
        assert all(r.poll() is None for r in ranks), (tmp_path / "rank-1.err").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # While the ranks measure, another writer is refused, sharded or not.
    with pytest.raises(SweepLocked, match=rf"run \w+, rank 0 of 2, pid {ranks[0].pid}"):
        run_sweep(CASES, out, min_time=0.001, progress=False)
    with pytest.raises(SweepLocked), run_lock(out, "another-run"):
        pass
    ranks[1].send_signal(signal.SIGINT)  # Ctrl-C; rank 0 waits for it in a collective: torchrun ends it
    ranks[1].wait(timeout=30)
    wait_all(ranks, tmp_path)
    assert ranks[1].returncode != 0

    # Each rank's rows are in its part; results.csv is not written until the end.
    parts = {path.name: read_rows(path) for path in sorted((out / PARTS_DIR).iterdir())}
    assert read_rows(out) == [] and sorted(parts) == ["rank-0.csv", "rank-1.csv"]
    assert len(parts["rank-0.csv"]) == 4 and len(parts["rank-1.csv"]) == 3  # all but the sparse case
    measured = {case_key(r): r for rows in parts.values() for r in rows}

    command = [
        sys.executable,
        "-m",
        "lsr.bench",
        "run",
        *GRID,
        "--resume",
        "--out",
        str(tmp_path / "sharded"),
    ]
    ranks = start_ranks(command, tmp_path)  # resume, sharded again, from the command line
    errors = wait_all(ranks, tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], errors

    sharded, alone = read_rows(out), read_rows(tmp_path / "alone" / "cpu")
    assert sorted(outcome(sharded)) == sorted(outcome(alone)) and len(alone) == len(CASES)
    assert [case_key(r) for r in sharded if case_key(r) in measured] == list(measured)  # kept first
    assert all(r == measured[case_key(r)] for r in sharded if case_key(r) in measured)  # not measured again
    assert not (out / PARTS_DIR).exists()  # merged, then removed
    metadata = read_metadata(out)["shard"]
    assert metadata["world_size"] == 2 and [r["cases"] for r in metadata["ranks"]] == [4, 4]
    # two CPU ranks on one host: said on the console, in metadata.json, and in every row
    assert metadata["shared_hosts"] == {socket.gethostname(): 2}
    assert all("shared host: 2 ranks measured" in r["message"] for r in sharded)
    assert "SharedHostWarning: several ranks measured on one host's CPU" in errors[0]
    assert not any("shared host" in r["message"] for r in alone)
    assert "implementation" in (tmp_path / "rank-0.out").read_text()  # rank 0 alone prints the table
    assert (tmp_path / "rank-1.out").read_text() == ""


# --- several machines ---------------------------------------------------------------------------------


def fake_run(folder: Path, medians: dict[str, float], metadata: dict, machine: str = "") -> Path:
    """A run of the floors and native at N=4, C=3, forward+backward, with native's median given per
    machine; `machine` empty: a file older than the machine column (its metadata says which)."""
    rows = []
    for name, scale in ((FLOOR, 0.5), (FLOOR_ALLOC, 0.6), ("native", 1.0)):
        kind = FLOOR if name in FLOORS else lsr.get(name).smoothing_kind
        row = new_row(Case(name, "cpu", "float32", 4, 3, 0.1, "forward+backward"), kind)
        median = medians["native"] * scale
        rows.append(row | {"median_s": median, "iqr_s": 1e-6, "runs": 7, "threads": 1, "machine": machine})
    write_rows(folder / RESULTS_FILE, rows)
    if not machine:  # drop the column, as schema 3 wrote it
        lines = (folder / RESULTS_FILE).read_text().splitlines()
        at = list(COLUMN_TYPES).index("machine")
        drop = "\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != at) for line in lines)
        (folder / RESULTS_FILE).write_text(drop + "\n")
    write_metadata(folder / METADATA_FILE, {"device": "cpu", "device_name": "test machine"} | metadata)
    return folder


@pytest.fixture
def two_machines(tmp_path) -> tuple[Path, Path]:
    here = fake_run(tmp_path / "here" / "cpu", {"native": 2e-3}, {"machine": machine_name()}, machine_name())
    old = {"cpu_model": "Intel(R) Xeon(R) Platinum 8488C", "cpu_count": 8, "vector_isa": "avx512f"}
    there = fake_run(tmp_path / "there" / "cpu", {"native": 1e-3}, old)
    return here, there


def test_merge_tags_every_row_with_its_machine_and_keeps_each_machines_metadata(
    tmp_path, two_machines, capsys
):
    here, there = two_machines
    code = cli.main(["merge", str(tmp_path / "here"), str(tmp_path / "there"), "--out", str(tmp_path / "m")])
    assert code == 0
    assert capsys.readouterr().out.strip() == (
        f"{tmp_path / 'm' / 'cpu' / RESULTS_FILE}: 3 rows of {machine_name()}, 3 rows of xeon-8c-avx512f"
    )
    rows = read_rows(tmp_path / "m" / "cpu")  # one case twice: on two machines
    assert [r["machine"] for r in rows] == [machine_name()] * 3 + ["xeon-8c-avx512f"] * 3
    assert [case_key(r) for r in rows[:3]] == [case_key(r) for r in rows[3:]]
    metadata = read_metadata(tmp_path / "m" / "cpu")
    assert metadata[MACHINES]["xeon-8c-avx512f"]["cpu_count"] == 8
    assert [i["machine"] for i in metadata["inputs"]] == [machine_name(), "xeon-8c-avx512f"]

    with pytest.raises(ValueError, match="both have a row of machine xeon-8c-avx512f"):
        merge_runs([there, tmp_path / "m" / "cpu"], tmp_path / "again")
    with pytest.raises(ValueError, match="cannot resume .* several machines"):
        run_sweep(CASES[:1], tmp_path / "m" / "cpu", resume=True, min_time=0.001, progress=False)
    with pytest.raises(ValueError, match="holds results already"):
        merge_runs([there], here)


def test_plot_and_compare_put_machines_side_by_side(tmp_path, two_machines, capsys, monkeypatch):
    merge_runs(list(two_machines), tmp_path / "m")
    monkeypatch.setattr(plot, "DRAW", {"floor_multiple": plot.DRAW["floor_multiple"]})
    figures = []
    real_save = style.save
    monkeypatch.setattr(style, "save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    assert cli.main(["plot", str(tmp_path / "m"), "--out", str(tmp_path / "charts")]) == 0
    assert (tmp_path / "charts" / machine_name() / "floor_multiple_float32.png").exists()
    assert (tmp_path / "charts" / "xeon-8c-avx512f" / "floor_multiple_float32.png").exists()
    panels = figures[-1].axes  # side by side: a column per machine
    assert [ax.get_title().splitlines()[0] for ax in panels] == [machine_name(), "xeon-8c-avx512f"]
    native = [next(line for line in ax.lines if line.get_label() == "native") for ax in panels]
    assert [list(line.get_ydata()) for line in native] == [[2e-3], [1e-3]]

    capsys.readouterr()
    argv = [
        "compare",
        str(tmp_path / "m"),
        "--machine",
        "xeon-8c-avx512f",
        "--against-machine",
        machine_name(),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"new: xeon-8c-avx512f, old: {machine_name()}")
    assert "3 cases compared, 3 changed" in out and "0.500" in out and "faster" in out
    assert cli.main(["compare", str(tmp_path / "m"), str(tmp_path / "m")]) == 2
    assert "holds rows of machines" in capsys.readouterr().err
    assert (
        cli.main(
            ["compare", str(tmp_path / "m"), "--machine", "nowhere", "--against-machine", machine_name()]
        )
        == 2
    )
    assert "no rows of machine 'nowhere'" in capsys.readouterr().err
