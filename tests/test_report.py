"""The report layer, what a run's rows say: the ship table, floors of the right kind, bandwidth,
subtitles, variants, threads, and compare.

Rows are made by hand (nothing is measured), so each test states the numbers it checks.
"""

import pytest

import lsr
from helpers import FAST, small_sweep
from lsr.bench import data as results
from lsr.bench.data import (
    FLOOR,
    FLOOR_ALLOC,
    FLOORS,
    Case,
    new_row,
)
from lsr.bench.report import plot, ship, style
from lsr.bench.report import summary as report
from lsr.bench.report.compare import compare, format_comparison
from lsr.bench.report.selection import achieved_bandwidth, variants
from lsr.bench.sweep.grid import Grid
from lsr.bench.sweep.runner import (
    run_sweep,
)

FWD_BWD = "forward+backward"
METADATA = {
    "device": "cpu",
    "device_name": "Test CPU",
    "threads": 2,
    "torch_version": "2.13.0",
    "vector_isa": "avx512f",
    "cache_bytes": {"L1d": 48 * 2**10, "L2": 2**20, "L3": 32 * 2**20},
    "copy_bandwidth_bytes_per_s": {"cpu": 10e9},
}


def row(name, n=64, c=100, median=1e-3, status="ok", pass_=FWD_BWD, smoothing=0.1, **case) -> dict:
    """A results row as the runner writes it: a median (and a 1% IQR) only when ok."""
    kind = FLOOR if name in FLOORS else lsr.REGISTRY[name].smoothing_kind if name in lsr.REGISTRY else "exact"
    r = new_row(Case(name, "cpu", "float32", n, c, smoothing, pass_, **case), kind)
    if status != "ok":
        return r | {"status": status, "message": f"{status} here"}
    timing = {"median_s": median, "iqr_s": median / 100, "runs": 9, "threads": 2, "peak_bytes": 4 * n * c}
    return r | timing


def at_size(n=64, c=100, **medians) -> list[dict]:
    """The floors (1 and 1.5 ms) and a forward+backward row per implementation: median in ms, or a status."""
    rows = [row(FLOOR, n, c, 1e-3), row(FLOOR_ALLOC, n, c, 1.5e-3)]
    for name, value in medians.items():
        name = name.replace("_", "-")
        rows.append(
            row(name, n, c, value * 1e-3) if isinstance(value, float) else row(name, n, c, status=value)
        )
    return rows


def marks(table: tuple, line: int = 0) -> dict[str, str]:
    """implementation -> mark in one line of a ship table."""
    _, headers, lines, _ = table
    ship_at = headers.index("peak MiB") + 1
    return dict(zip(headers[ship_at:], lines[line][ship_at:], strict=True))


def cell(table: tuple, header: str, line: int = 0) -> str:
    _, headers, lines, _ = table
    return lines[line][headers.index(header)]


# --- which one to ship ------------------------------------------------------------------------------


def test_ship_table_picks_the_fastest_gated_implementation_and_marks_the_rest():
    rows = at_size(native=4.0, dense=6.0, fused_exact="failed", native_compiled=2.0, fused_exact_inplace=1.2)
    rows += [row("sparse", 64, 100, 3.0), row("fused-sparse", 64, 100, status="not-available")]
    # at C = 1 the grid gives the SparseLSR losses no row (they need 2 classes)
    rows += [row(name, 64, 1, 1e-3) for name in FLOORS + ("native", "dense", "native-compiled")]
    exact, in_place, sparse = ship.ship_tables([r for r in rows if r["classes"] == 100])
    assert exact[0].startswith("exact smoothing, out-of-place")
    assert cell(exact, "ship") == "native-compiled"  # fused-exact failed the gate: never a candidate
    assert cell(exact, "vs native") == "2.00×" and cell(exact, "vs native-compiled") == "1.00×"
    assert cell(exact, "fwd+bwd ms") == "2.000" and cell(exact, "peak MiB") == "0.0"
    assert marks(exact) == {"native": "ok", "dense": "ok", "fused-exact": "failed", "native-compiled": "ok"}
    assert in_place[0].startswith("exact smoothing, in-place") and "not a drop-in" in in_place[0]
    assert cell(in_place, "ship") == "fused-exact-inplace" and cell(in_place, "vs native") == "3.33×"
    # registered in-place losses that cannot run on this CPU (liger: CUDA only) are marked, not left out
    exact_in_place = [
        (n, impl)
        for n, impl in lsr.REGISTRY.items()
        if impl.inplace_backward and impl.smoothing_kind == "exact"
    ]
    cannot = {n for n, impl in exact_in_place if not impl.runs_on("cpu")}
    assert marks(in_place) == {"fused-exact-inplace": "ok"} | dict.fromkeys(cannot, "not available")
    assert sparse[0].startswith("SparseLSR, out-of-place")
    assert cell(sparse, "ship") == "sparse" and marks(sparse) == {
        "sparse": "ok",
        "fused-sparse": "not available",
    }

    # where an implementation has no row, the registry says why: too few classes, or nothing known
    by_size = {line[2]: line for line in ship.ship_tables(rows)[2][2]}
    assert by_size["1"][3] == "none passed" and by_size["1"][-2:] == ["unsupported", "unsupported"]
    assert marks(ship.ship_tables(rows)[0])["fused-exact"] == "not measured"


def test_ship_table_says_none_passed_and_ties_within_the_noise():
    failed = ship.ship_tables(at_size(native="failed", dense="oom"))[0]
    assert cell(failed, "ship") == "none passed" and cell(failed, "fwd+bwd ms") == ""
    assert marks(failed) == {"native": "failed", "dense": "oom"}
    # 1% IQR each: 2.00 and 2.01 ms are within the noise, 2.5 ms is not
    close = ship.ship_tables(at_size(native=2.5, dense=2.01, fused_exact=2.0))[0]
    assert cell(close, "ship") == "fused-exact (≈ dense)"


def test_ship_table_leaves_out_busy_rows_and_says_so():
    rows = at_size(native=4.0, dense=5.0)
    rows = [r | {"busy": r["implementation"] == "native"} for r in rows]  # the fastest, timed while busy
    (exact,) = ship.ship_tables(rows)
    assert cell(exact, "ship") == "dense"
    assert "1 rows timed while other processes loaded the machine" in ship.format_ship_report(rows)
    assert any("left out" in line for line in ship.ship_section(rows))
    assert "busy" not in ship.format_ship_report(at_size(native=4.0, dense=5.0))
    assert marks(exact)["native"] == "ok (busy)"  # shown, not chosen
    all_busy = [r | {"busy": True} for r in rows]
    (exact,) = ship.ship_tables(all_busy)
    assert cell(exact, "ship") == "none: busy rows only"


def test_ship_table_uses_the_plain_variant_only():
    rows = at_size(native=4.0, dense=5.0)
    rows += [row("dense", median=1e-4, ignore_fraction=0.3), row("dense", median=1e-4, weighted=True)]
    rows += [row("dense", median=1e-4, smoothing=0.0), row("dense", median=1e-4, pass_="forward")]
    (exact,) = ship.ship_tables(rows)
    assert cell(exact, "ship") == "native" and len(exact[2]) == 1
    assert ship.ship_tables([r | {"smoothing": 0.0} for r in rows]) == []  # smoothing 0: nothing to ship


def test_ship_tables_in_the_console_and_the_readme():
    rows = at_size(native=4.0, fused_exact=2.0, fused_exact_inplace=1.5)
    console = ship.format_ship_report(rows)
    assert console.startswith("Which one to ship (") and "exact smoothing, in-place" in console
    assert "| float32 | 64 | 100 | fused-exact | 2.000 | 2.00× |" in "\n".join(ship.ship_section(rows))
    assert ship.format_ship_report([r for r in rows if r["implementation"] in FLOORS]) == ""


# --- floors, bandwidth --------------------------------------------------------------------------------


def test_floor_multiple_divides_by_the_floor_of_each_kind():
    rows = at_size(native=3.0, fused_exact_inplace=1.2) + at_size(
        128, 100, native=6.0, fused_exact_inplace=2.4
    )
    fig = plot.DRAW["floor_multiple"](rows, METADATA, "float32")
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert lines["native ÷ floor-alloc"] == pytest.approx([2.0, 4.0])  # 3 / 1.5 and 6 / 1.5
    assert lines["fused-exact-inplace ÷ floor"] == pytest.approx([1.2, 2.4])
    assert lines["floor-alloc ÷ floor"] == pytest.approx([1.5, 1.5])
    assert "in place: floor; out of place: floor-alloc" in fig.axes[0].get_ylabel()

    table = report.format_run_table(rows).splitlines()
    x_floor = {line.split()[0]: line.split()[8] for line in table[4:6]}
    assert x_floor == {"native": "2.00", "fused-exact-inplace": "1.20"}
    assert "floor-alloc for out-of-place ones" in table[-1]


def test_time_charts_draw_both_floors_in_their_own_styles():
    rows = at_size(native=3.0) + at_size(128, 100, native=6.0)
    fig = plot.DRAW["time_vs_batch"](rows, METADATA, "float32")
    floors = {
        line.get_label(): line.get_linestyle() for line in fig.axes[0].lines if line.get_color() == "black"
    }
    assert floors == {style.FLOOR_LABEL: "--", style.FLOOR_ALLOC_LABEL: "-."}
    assert len(fig.axes) == 1  # one pass measured: one row of panels


def test_bandwidth_in_the_tables_and_its_chart(tmp_path):
    rows = at_size(native=4.0) + at_size(1024, 1000, native=20.0)
    r = rows[-1]  # 4.1 MB of logits read and their gradient written in 20 ms: 410 MB/s, 4% of 10 GB/s
    assert achieved_bandwidth(r, METADATA) == pytest.approx((4.096e8, 0.04096))
    assert achieved_bandwidth(r | {"bandwidth_bytes_per_s": 1e9, "bandwidth_fraction": 0.1}) == (1e9, 0.1)
    assert achieved_bandwidth(row("native", pass_="forward")) == (None, None)
    summary = report.summary_table(rows, "float32", METADATA)
    assert "| 1024 | 1000 | native | 20.000 | 0.200 | 13.33 | 0.4 | 4% |" in summary
    assert "| 1024 | 1000 | floor-alloc (exp, new tensor) | 1.500 | 0.015 |  | 5.5 | 55% |" in summary

    written = plot.plot_run(rows, METADATA, tmp_path)
    chart = tmp_path / "bandwidth_float32.png"
    assert chart in written and chart.read_bytes()[:4] == b"\x89PNG"
    fig = plot.DRAW["bandwidth"](rows, METADATA, "float32")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert "copy bandwidth, 10 GB/s" in labels and "logits fill a cache (L2 1 MiB, L3 32 MiB)" in labels


# --- what decides a CPU's ratios ------------------------------------------------------------------------


def test_every_subtitle_records_the_isa_caches_and_copy_bandwidth(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(style, "save", lambda fig, path: figures.append(fig) or path)
    rows = at_size(native=3.0, dense=4.0) + at_size(128, 1000, native=6.0, dense=9.0)
    rows += at_one_thread(rows, 1.8)  # so that the threads chart is drawn too
    assert len(plot.plot_run(rows, METADATA, tmp_path)) == len(plot.DRAW)
    for fig in figures:
        titles = [fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)]
        assert any("avx512f · L2 1 MiB, L3 32 MiB · copy 10 GB/s" in t for t in titles), titles


def at_one_thread(rows: list[dict], slower: float) -> list[dict]:
    """The same rows measured at 1 thread, `slower` times their median."""
    return [r | {"threads": 1, "median_s": r["median_s"] * slower} for r in rows]


def test_thread_scaling_chart_and_efficiency_column(tmp_path):
    """Speedup over 1 thread per implementation beside the floors' own; the summary's parallel
    efficiency is speedup / threads; every other chart and table shows the 2-thread rows only."""
    both = at_size(native=3.0, fused_exact=2.0)
    rows = both + at_one_thread(both[:2], 1.9) + at_one_thread(both[2:], 1.5)
    fig = plot.DRAW["thread_scaling"](rows, METADATA, "float32")
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].lines}
    assert list(lines["native"]) == [1.0, pytest.approx(1.5)] and list(lines["floor: exp(z, out=buf)"]) == [
        1.0,
        pytest.approx(1.9),
    ]
    assert list(lines["ideal: speedup = threads"]) == [1, 2]
    table = report.summary_table(rows, "float32", METADATA)
    cells = {line.split("|")[3].strip(): line.split("|")[-2].strip() for line in table.splitlines()[2:]}
    assert cells["native"] == "0.75" and cells["floor (exp, out=buf)"] == "0.95"
    assert "| 3.000 |" in table and "| 4.500 |" not in table  # native's 2-thread median only
    assert [r["threads"] for r in ship.ship_rows(rows)] == [2, 2]
    plain = report.summary_table(both, "float32", METADATA)  # no 1-thread rows: no column
    assert (
        "parallel efficiency" not in plain and plot.DRAW["thread_scaling"](both, METADATA, "float32") is None
    )


def test_the_summary_lists_the_machine_and_ships(tmp_path):
    run = tmp_path / "cpu"
    results.write_rows(
        run / results.RESULTS_FILE, at_size(native=4.0, fused_exact=2.0) + at_size(128, 100, native=8.0)
    )
    results.write_metadata(run / results.METADATA_FILE, METADATA)
    text = report.write_summary(tmp_path).read_text()
    for line in ("| vector_isa | avx512f |", "| cpu_caches | L1d 48 KiB, L2 1 MiB, L3 32 MiB |"):
        assert line in text
    assert "| copy_bandwidth | 10 GB/s |" in text and "### Which one to ship" in text
    assert text.index("### Which one to ship") < text.index("### float32")
    assert "| 64 | 100 | fused-exact | 2.000 | 0.020 | 1.33 |" in text  # × its floor: 2 / 1.5


# --- variants ---------------------------------------------------------------------------------------------


def variant_rows() -> list[dict]:
    rows = at_size(native=3.0) + at_size(128, 100, native=6.0)
    for case in ({"ignore_fraction": 0.3}, {"weighted": True}):
        rows += [row("native", 64, 100, 9e-3, **case), row("native", 128, 100, 18e-3, **case)]
    return rows


def test_variants_split_by_ignore_fraction_and_weights(tmp_path):
    split = variants(variant_rows())
    assert [(v.suffix, v.label) for v in split] == [
        ("", "ignore 0, unweighted"),
        ("_weighted", "ignore 0, weighted"),
        ("_ignore0.3", "ignore 0.3, unweighted"),
    ]
    for v in split:  # each: its own two native rows and the four floor rows
        assert (
            len(v.rows) == 6
            and len(
                {(r["ignore_fraction"], r["weighted"]) for r in v.rows if r["implementation"] == "native"}
            )
            == 1
        )

    names = {p.name for p in plot.plot_run(variant_rows(), METADATA, tmp_path)}
    assert {
        "time_vs_batch_float32.png",
        "time_vs_batch_float32_weighted.png",
        "bandwidth_float32_ignore0.3.png",
    } <= names
    fig = plot.DRAW["time_vs_batch"](split[2].rows, METADATA, "float32")
    native = next(line for line in fig.axes[0].lines if line.get_label() == "native")
    assert list(native.get_ydata()) == [9e-3, 18e-3]  # the ignore-0.3 rows alone


def test_the_run_table_names_the_variant_where_there_are_several():
    lines = report.format_run_table(variant_rows()).splitlines()
    assert lines[0].split()[6] == "variant"
    assert "ignore 0, weighted" in lines[-2] and "ignore 0.3, unweighted" in lines[-4]
    assert "variant" not in report.format_run_table(at_size(native=3.0)).splitlines()[0]


def test_compare_flags_changes_beyond_noise(tmp_path):
    measured = run_sweep(
        Grid(["native"], ["cpu"], ["float32"], [4], [3], passes=["forward"]).cases(), tmp_path, **FAST
    )
    old = [r | {"iqr_s": 0.0} for r in measured]  # a noiseless baseline: the verdict is about the ratio
    same = [r | {"median_s": r["median_s"] * 1.01} for r in old]
    slower = [r | {"median_s": r["median_s"] * 3, "iqr_s": 0.0} for r in old]
    assert not any(e["verdict"] for e in compare(old, same))
    assert all(e["verdict"] == "slower" for e in compare(old, slower))


def test_compare_ignores_or_marks_busy_rows(tmp_path):
    old = run_sweep(small_sweep()[:2], tmp_path, **FAST)
    new = [old[0] | {"busy": True}, old[1] | {"busy": False}]
    assert [e["busy"] for e in compare(old, new)] == [True, False]
    assert [e["case"] for e in compare(old, new, ignore_busy=True)] == [Case.of_row(old[1])]
    assert "1 were timed on a busy machine" in format_comparison(compare(old, new))


def test_charts_mark_rows_timed_on_a_busy_machine(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(style, "save", lambda fig, path: figures.append(fig) or path)
    rows = at_size(native=3.0, dense=4.0) + at_size(128, 1000, native=6.0, dense=9.0)
    rows = [r | {"busy": r["implementation"] == "native" and r["batch"] == 128} for r in rows]
    plot.plot_run(rows, METADATA, tmp_path)
    titles = [fig.get_suptitle() or fig.axes[0].get_title() for fig in figures]
    assert all("1 rows timed while other processes loaded the machine" in t for t in titles), titles
    time_chart = next(fig for fig in figures if fig.get_suptitle().startswith("time vs batch"))
    hollow = [line for ax in time_chart.axes for line in ax.lines if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and 128 * 0.9 < hollow[0].get_xdata()[0] < 128 * 1.1


def test_coinciding_lines_stay_visible_and_skipped_charts_are_named(tmp_path):
    """Two implementations with the same numbers are drawn side by side, not one over the other; a
    one-size run names the charts it cannot draw and what they need."""
    rows = at_size(native=3.0, dense=3.0) + at_size(128, 100, native=6.0, dense=6.0)
    fig = plot.DRAW["time_vs_batch"](rows, METADATA, "float32")
    xs = {line.get_label(): tuple(line.get_xdata()) for line in fig.axes[0].lines}
    assert xs["native"] != xs["dense"] and all(
        abs(a / b - 1) < 0.1 for a, b in zip(xs["native"], xs["dense"], strict=True)
    )
    skipped: list[str] = []
    plot.plot_run(at_size(native=3.0), METADATA, tmp_path, skipped)
    assert any(
        line.startswith("time_vs_batch (float32): not drawn, it needs two or more batch sizes")
        for line in skipped
    )
    assert not any(line.startswith("thread_scaling") for line in skipped)  # not asked for: no threads axis
