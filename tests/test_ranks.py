"""Nothing lost and nothing silently wrong across ranks (issue 24): results readers refuse what is no
measurement, merge and plot refuse a folder whose rows still lie in a sharded sweep's parts, the
vocab-parallel benchmark writes atomically, reads strictly, refuses bad arguments on every rank
before any collective, and refuses ranks launched with different settings."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, ROOT, small_sweep
from lsr.bench import vocab_parallel
from lsr.bench.cli import main as cli_main
from lsr.bench.data import RESULTS_FILE, SchemaError, load, read_rows, write_rows
from lsr.bench.data.merge import PARTS_DIR, merge_runs
from lsr.bench.sweep.runner import run_sweep


@pytest.mark.parametrize(
    "column, bad", [("median_s", 0.0), ("median_s", -0.5), ("peak_bytes", -1), ("host_s", 0.0)]
)
def test_an_ok_row_needs_positive_times_and_non_negative_bytes(tmp_path, column, bad):
    rows = run_sweep(small_sweep()[:2], tmp_path, **FAST)
    write_rows(tmp_path / RESULTS_FILE, [rows[0], rows[1] | {column: bad}])
    with pytest.raises(SchemaError, match=rf"results.csv:3: .*{column}"):
        read_rows(tmp_path)


def test_merge_and_plot_refuse_a_folder_whose_rows_are_still_in_its_parts(tmp_path, capsys):
    run = tmp_path / "run"
    rows = run_sweep(small_sweep()[:2], run, **FAST)
    write_rows(run / PARTS_DIR / "rank-0.csv", rows)  # what a SIGKILLed sharded launch leaves
    write_rows(run / RESULTS_FILE, [])
    with pytest.raises(SchemaError, match="part files of an interrupted sharded sweep.*--resume"):
        merge_runs([run], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert cli_main(["plot", str(run)]) == 2
    assert "--resume to fold them in" in capsys.readouterr().err
    (run / PARTS_DIR / "rank-0.csv").unlink()
    with pytest.raises(SchemaError, match="no rows"):  # an empty run is never read as a run
        load(run)


def vp_row(**changes) -> dict:
    row = dict.fromkeys(vocab_parallel.FIELDS, "1") | {"implementation": "vocab-parallel", "loss": "exact"}
    return row | {"dtype": "float32", "device": "cpu", "median_s": "0.01", "iqr_s": "0.001"} | changes


def test_the_vocab_parallel_writer_is_atomic_and_its_reader_strict(tmp_path, monkeypatch):
    vocab_parallel.write_results(tmp_path, [vp_row()], {"machine": "m"})
    before = (tmp_path / vocab_parallel.CSV_NAME).read_text()
    assert len(vocab_parallel._read_rows(tmp_path / vocab_parallel.CSV_NAME)) == 1

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lsr.bench.data.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        vocab_parallel.write_results(tmp_path, [vp_row(world_size="2"), vp_row(world_size="2", rank="1")], {})
    monkeypatch.undo()
    assert (tmp_path / vocab_parallel.CSV_NAME).read_text() == before  # the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "vocab_parallel.csv"]

    cut = before.rstrip("\n")[:-3] + "\n"  # a row cut off mid-number reads as another number: refused
    for text, match in (
        (before.replace("0.01", "zero"), "median_s"),
        (before.replace("0.01", "0"), "median_s"),
    ):
        (tmp_path / vocab_parallel.CSV_NAME).write_text(text)
        with pytest.raises(SchemaError, match=match):
            vocab_parallel._read_rows(tmp_path / vocab_parallel.CSV_NAME)
    (tmp_path / vocab_parallel.CSV_NAME).write_text(cut)
    with pytest.raises(SchemaError):
        vocab_parallel._read_rows(tmp_path / vocab_parallel.CSV_NAME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, per_rank_args: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """The vocab-parallel benchmark as torchrun would start it, each rank with its own arguments."""
    port, world = free_port(), len(per_rank_args)
    children = []
    for rank, args in enumerate(per_rank_args):
        env = os.environ | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "-m", "lsr.bench.vocab_parallel", "--out", str(tmp_path / "out"), *args]
        children.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for child in children:
        out, err = child.communicate(timeout=90)  # a hang fails the test
        done.append(subprocess.CompletedProcess(child.args, child.returncode, out, err))
    return done


TINY = ["--batch", "8", "--classes", "64", "--samples", "3"]


def test_bad_arguments_are_refused_on_every_rank_before_any_collective(tmp_path):
    ranks = launch(tmp_path, [[*TINY, "--samples", "0"], [*TINY, "--samples", "0"]])
    assert [r.returncode for r in ranks] == [2, 2]
    assert "--samples: must be at least 3" in ranks[0].stderr and ranks[1].stderr == ""
    assert not (tmp_path / "out").exists()


def test_ranks_given_different_settings_are_refused_naming_the_setting(tmp_path):
    ranks = launch(tmp_path, [[*TINY, "--smoothing", "0.1"], [*TINY, "--smoothing", "0.2"]])
    assert [r.returncode for r in ranks] == [2, 2]
    assert "different --smoothing: rank 0 0.1, rank 1 0.2" in ranks[0].stdout
    assert not (tmp_path / "out" / vocab_parallel.CSV_NAME).exists()
