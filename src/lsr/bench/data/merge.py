"""Results files made one: the parts of a sharded sweep into its results.csv, and the runs of several
machines into one directory (`lsr-bench merge`), each row tagged with its machine.

A sharded sweep's ranks each write their rows to OUT/parts/rank-K.csv as they measure them (a
results file of its own); at the end rank 0 merges them into OUT/results.csv and the parts go. An
interrupted sweep leaves its parts, and a resume, sharded or not, folds them into results.csv first.

A merged directory holds rows of several machines: the `machine` column tells them apart (rows of a
file older than that column take their run's machine, from metadata.json), and metadata.json keeps
each machine's own metadata under `machines`. One machine has at most one row per case; two
machines may each have one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from lsr.bench.data.lock import output_lock
from lsr.bench.data.rows import load, read_rows, write_metadata, write_rows
from lsr.bench.data.schema import (
    METADATA_FILE,
    PARTS_DIR,
    RESULTS_FILE,
    case_key,
    machine_name_of,
)

MACHINES = "machines"  # metadata.json's key, in a merged directory: each machine's metadata by name

# --- the parts of a sharded sweep -------------------------------------------------------------------------


def part_path(out_dir: Path, rank: int) -> Path:
    """Where rank `rank` of a sharded sweep writes its rows."""
    return out_dir / PARTS_DIR / f"rank-{rank}.csv"


def part_files(out_dir: Path) -> list[Path]:
    """The part files in out_dir (those this host sees)."""
    return sorted((out_dir / PARTS_DIR).glob("rank-*.csv"))


def read_parts(out_dir: Path) -> tuple[list[Path], list[dict]]:
    """The part files in out_dir (those this host sees) and their rows."""
    paths = part_files(out_dir)
    return paths, [row for path in paths for row in read_rows(path)]


def fold(rows: Iterable[dict], later: Iterable[dict]) -> list[dict]:
    """`rows` with each row of `later` in place of the row of its case (appended where it has none).
    The parts of one sweep never share a case (the ranks' shares are disjoint)."""
    folded = {case_key(row): row for row in rows}
    folded.update((case_key(row), row) for row in later)
    return list(folded.values())


def remove(paths: Iterable[Path]) -> None:
    """Remove files another rank may have removed already, and their folder once empty."""
    folders = set()
    for path in paths:
        folders.add(path.parent)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty, or gone already
            folder.rmdir()


def fold_parts(out_dir: Path) -> None:
    """Fold the parts an interrupted sharded sweep left into out_dir/results.csv, then remove them."""
    paths, rows = read_parts(out_dir)
    if not paths:
        return
    results = out_dir / RESULTS_FILE
    write_rows(results, fold(read_rows(results) if results.exists() else [], rows))
    remove(paths)


# --- machines -------------------------------------------------------------------------------------------


def machine_of(metadata: dict, where: str | Path = "") -> str:
    """The machine a run's metadata names: its `machine`, or, in metadata older than that key, the
    name `lsr.bench.measure.machine_name` gives its cpu_model, cpu_count and vector_isa."""
    if metadata.get("machine"):
        return metadata["machine"]
    if metadata.get("cpu_model") and metadata.get("cpu_count"):
        isa = metadata.get("vector_isa") or "unknown"  # metadata older than the ISA: vector_isa()'s "unknown"
        return machine_name_of(metadata["cpu_model"], metadata["cpu_count"], isa)
    raise ValueError(
        f"{where}: its rows name no machine and its metadata.json names none either "
        "(no machine, cpu_model or cpu_count): cannot tell which machine measured them"
    )


def by_machine(
    rows: list[dict], metadata: dict, where: str | Path = ""
) -> list[tuple[str, list[dict], dict]]:
    """(machine, its rows, its metadata) for each machine in a run, in the order of the rows; a row
    that names no machine is its run's (`machine_of`). A run of one machine is one entry."""
    merged = metadata.get(MACHINES) or {}
    split: dict[str, list[dict]] = {}
    for row in rows:
        name = row.get("machine") or machine_of(metadata, where)
        split.setdefault(name, []).append(row if row.get("machine") else row | {"machine": name})
    return [(name, named, merged.get(name, metadata)) for name, named in split.items()]


def is_merged(rows: list[dict], metadata: dict) -> bool:
    """Whether these are the rows of a merged directory, or of more than one machine."""
    return MACHINES in metadata or len({row["machine"] for row in rows if row.get("machine")}) > 1


def rows_of(rows: list[dict], metadata: dict, machine: str, where: str | Path = "") -> list[dict]:
    """The rows `machine` measured; ValueError naming the machines there are when it has none."""
    found = {name: named for name, named, _ in by_machine(rows, metadata, where)}
    if machine not in found:
        raise ValueError(f"{where} has no rows of machine {machine!r}; it has {', '.join(found)}")
    return found[machine]


def merge_runs(runs: list[Path], out: Path) -> dict[str, int]:
    """Write the rows of `runs` (run directories or their results.csv, merged ones too) into
    out/results.csv, each tagged with its machine, and each machine's metadata into out/metadata.json
    under `machines`; return the rows written per machine. Everything is read before anything is
    written, so `out` may be one of the runs. ValueError when two runs have a row of one case on
    one machine, or when `out` holds other results."""
    rows: dict[tuple, dict] = {}
    where: dict[tuple, Path] = {}
    kept: dict[str, dict] = {}
    inputs = []
    for run in runs:
        run_rows, metadata = load(run)  # refuses a folder with unfolded parts, or with no rows
        for machine, named, own in by_machine(run_rows, metadata, run):
            for row in named:
                key = (machine, *case_key(row))
                if key in where:
                    raise ValueError(
                        f"{where[key]} and {run} both have a row of machine {machine} for "
                        f"{describe(row)}: merge one of them"
                    )
                rows[key], where[key] = row, run
            kept.setdefault(machine, {k: v for k, v in own.items() if k not in (MACHINES, "inputs")})
            inputs.append({"path": str(run), "machine": machine, "rows": len(named), "date": own.get("date")})
    target = out / RESULTS_FILE
    if target.exists() and not any(target.resolve() == _results(run).resolve() for run in runs):
        raise ValueError(f"{out} holds results already and is not one of the inputs: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        write_rows(target, list(rows.values()))
        write_metadata(out / METADATA_FILE, {MACHINES: kept, "inputs": inputs})
    counts: dict[str, int] = {}
    for machine, *_ in rows:
        counts[machine] = counts.get(machine, 0) + 1
    return counts


def describe(row: dict) -> str:
    """A row's case in a few words.

    >>> describe({"implementation": "native", "pass": "forward", "dtype": "float32", "batch": 4,
    ...           "classes": 3, "smoothing": 0.1, "ignore_fraction": 0.3, "weighted": False})
    'native forward float32 N=4 C=3 smoothing 0.1 ignore 0.3'
    """
    words = f"{row['implementation']} {row['pass']} {row['dtype']} N={row['batch']} C={row['classes']}"
    words += f" smoothing {row['smoothing']:g}"
    words += f" ignore {row['ignore_fraction']:g}" if row.get("ignore_fraction") else ""
    return words + (" weighted" if row.get("weighted") else "")


def _results(run: Path) -> Path:
    return run / RESULTS_FILE if run.is_dir() else run
