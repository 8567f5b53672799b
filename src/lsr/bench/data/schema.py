"""The results schema, declared once: the benchmark's vocabulary, a case, and the columns of a row.

One tidy CSV per run (a row per case, `results.csv`) and a JSON file describing the machine
(`metadata.json`). `COLUMNS` below is the one declaration of the CSV's columns: its header, which
columns may be empty, which were added later (and what an older file's rows read as there), the
parser's types (`lsr.bench.data.rows`) and the table in this docstring all come from it.

Schema version {version}:

{columns}

The floors: the logits losses' two, measured once per (device, dtype, batch, classes, threads),
forward+backward, on the same logits; the head losses' one:

| floor | what | the reference of |
|---|---|---|
| floor | `torch.exp(z, out=buf)` into one buffer kept across calls | implementations that write their gradient over the logits: they write no new tensor either |
| floor-alloc | `torch.exp(z)` into a new tensor every call: allocation and first touch of fresh pages included | every other implementation: it allocates its gradient |
| floor-gemm | the three GEMMs of an LM head alone (logits, d_hidden, d_weight), at a head case's shapes and dtype, once per (device, dtype, tokens, hidden, vocabulary, threads) | the head losses (`lsr.heads`): rows with hidden > 0 |

`floor_for(implementation)` names an implementation's floor.

Statuses:

| status | meaning |
|---|---|
| ok | gated, timed and metered |
| failed | the correctness gate rejected it: never timed |
| error | an exception other than running out of memory |
| oom | out of memory: an allocator's error, or the isolated child killed by SIGKILL (the OOM killer) |
| crashed | the isolated child died otherwise (the message names the signal or exit code) |
| skipped | its estimated peak memory exceeds what the device has available (the message says both) |
| unsupported | the implementation does not take this case (too few classes, backward of an in-place one) |
| not-available | the device is not on this machine, or the implementation cannot run on it here (e.g. no Triton) |

A file written before a column existed reads with that column's default; a file with a later
schema_version than this module's is refused. Two rows with one case key are refused, unless they
name two machines (a file merged by `lsr-bench merge`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from lsr.types import DTYPES, SMOOTHING_KINDS

# --- the benchmark's vocabulary: every other module of lsr.bench imports it from here ----------------

Pass = Literal["forward", "backward", "forward+backward"]
Status = Literal["ok", "failed", "error", "oom", "crashed", "skipped", "unsupported", "not-available"]
PASSES: tuple[Pass, ...] = get_args(Pass)
STATUSES: tuple[Status, ...] = get_args(Status)
FWD_BWD: Pass = "forward+backward"
FLOOR = "floor"  # the implementation name (and smoothing kind) of torch.exp(z, out=buf) on the same logits
FLOOR_ALLOC = "floor-alloc"  # torch.exp(z) into a new tensor each call; its smoothing kind is FLOOR too
FLOORS = (FLOOR, FLOOR_ALLOC)  # of the logits losses
# The head losses' floor (`lsr.heads`): the three GEMMs alone (logits, d_hidden, d_weight) at the case's
# shapes and dtype, measured once per (device, dtype, tokens, hidden, vocabulary, threads)
FLOOR_GEMM = "floor-gemm"
HEAD_FLOORS = (FLOOR_GEMM,)
ALL_FLOORS = (*FLOORS, *HEAD_FLOORS)
FLOOR_PEAK_FACTOR = 1.0  # what a floor allocates beyond its inputs, in logits (FLOOR: its buffer)
KINDS = (*SMOOTHING_KINDS, FLOOR)
IGNORE_INDEX = -100  # the target value of an ignored row (F.cross_entropy's default)
RESULTS_FILE, METADATA_FILE = "results.csv", "metadata.json"
PARTS_DIR = "parts"  # a sharded sweep's rows per rank (rank-K.csv) until rank 0 merges them
SCHEMA_VERSION = 7  # of results.csv and metadata.json; raise it with every column or status added
# Other processes using more than this fraction of the machine's CPU time during a case make it busy.
BUSY_LOAD = 0.10


# --- the columns ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of results.csv: its type, whether a row may leave it empty, the schema version
    that added it (1: from the start) and what a row of an older file reads there, and its meaning."""

    name: str
    type: type
    meaning: str
    optional: bool = False
    since: int = 1
    before: Any = None  # the value of a row written before `since`
    key: bool = False  # part of the case key: two rows with one key measured the same thing


COLUMNS = (
    Column("implementation", str, "registry name, or one of the two floors below", key=True),
    Column("smoothing_kind", str, '"exact", "sparse", or "floor" (both floors)'),
    Column("device", str, "device type: cpu, cuda, mps", key=True),
    Column("dtype", str, "logits dtype: float32, float64, float16, bfloat16", key=True),
    Column("batch", int, "N of the (N, C) logits; of a head case, the tokens", key=True),
    Column("classes", int, "C of the (N, C) logits; of a head case, the vocabulary V", key=True),
    Column(
        "smoothing",
        float,
        "label smoothing, 0 for plain cross-entropy (a floor row carries the sweep's first value, unused)",
        key=True,
    ),
    Column("pass", str, "forward, backward or forward+backward (a floor row: forward+backward)", key=True),
    Column(
        "ignore_fraction",
        float,
        "the fraction of targets set to ignore_index (-100), as padding does; floors: 0",
        since=3,
        before=0.0,
        key=True,
    ),
    Column(
        "weighted",
        bool,
        "class weights on: random positive weights, fixed seed; floors: False",
        since=3,
        before=False,
        key=True,
    ),
    Column("median_s", float, "median of one call, seconds (empty unless status is ok)", optional=True),
    Column("iqr_s", float, "interquartile range of one call, seconds", optional=True),
    Column(
        "timer",
        str,
        'what median_s was read from: "perf_counter" (the host clock around calls that synchronise '
        'the device) or "cuda-events" (CUDA events around each call on the device)',
        optional=True,
        since=4,
        before="perf_counter",
    ),
    Column(
        "wall_median_s",
        float,
        "the median of one call by the host clock with the device synchronised, beside CUDA events "
        "as a cross-check; empty where it is median_s itself",
        optional=True,
        since=4,
    ),
    Column(
        "host_s",
        float,
        "median host time to enqueue one call without waiting for the device: close to median_s "
        "means launch-bound (CUDA; empty on CPU)",
        optional=True,
        since=4,
    ),
    Column(
        "first_call_s",
        float,
        "the timed pass's first call, seconds, made before the gate: compilation and warm-up "
        "included where this process meets them first; the median excludes it",
        optional=True,
        since=3,
    ),
    Column("runs", int, "calls timed", optional=True),
    Column(
        "threads",
        int,
        "torch's intra-op thread count the case ran with; part of the case key since 5 (a run may "
        "measure a case at 1 thread and at all cores)",
        optional=True,
        key=True,
    ),
    Column(
        "hidden",
        int,
        "0 for a logits loss; H of a head case (`lsr.heads`): (N, H) hidden states times a (V, H) "
        "lm_weight, its logits never given",
        since=7,
        before=0,
        key=True,
    ),
    Column("min_time", float, "the run's timing budget per case (s)", optional=True, since=2),
    Column("logit_std", float, "the logits' standard deviation", optional=True, since=2),
    Column(
        "peak_bytes",
        int,
        "peak bytes allocated above those allocated before the pass (empty where not measurable)",
        optional=True,
    ),
    Column(
        "peak_rss_bytes", int, "the process's peak resident set during the pass (CPU on Linux)", optional=True
    ),
    Column("logits_bytes", int, "N * C * itemsize, the size of the logits and of their gradient"),
    Column(
        "bandwidth_bytes_per_s",
        float,
        "2 * logits_bytes / median_s: the least traffic of a forward+backward (read the logits, "
        "write the gradient) per second; forward+backward rows only",
        optional=True,
        since=3,
    ),
    Column(
        "bandwidth_fraction",
        float,
        "bandwidth_bytes_per_s / the device's copy bandwidth measured in the same run "
        "(metadata.json copy_bandwidth_bytes_per_s): 1 is a large copy's speed",
        optional=True,
        since=3,
    ),
    Column(
        "max_rel_error", float, "the correctness gate's largest relative error against float64", optional=True
    ),
    Column(
        "other_load",
        float,
        "CPU time other processes used while the case was timed, as a fraction of the machine; "
        "empty when timed too briefly to tell (under about 0.4 s)",
        optional=True,
        since=2,
    ),
    Column(
        "busy",
        bool,
        f"other_load above BUSY_LOAD ({BUSY_LOAD:.2f}): the time may be inflated; the status stays ok",
        optional=True,
        since=2,
    ),
    Column("status", str, "one of the statuses below"),
    Column(
        "message", str, "why, when status is not ok; a warning on an ok row (e.g. a wide IQR)", optional=True
    ),
    Column(
        "machine",
        str,
        'the machine\'s stable name, `lsr.bench.measure.machine_name()` (e.g. "epyc-2c-avx2"): '
        "merged results from several machines are told apart by it",
        optional=True,
        since=4,
        before="",
    ),
    Column(
        "git_commit",
        str,
        'the checkout\'s commit the row was measured at ("-dirty" with local changes): a resumed '
        "or merged file keeps each row's own",
        optional=True,
        since=6,
        before="",
    ),
    Column(
        "schema_version",
        int,
        "the version of this schema the file was written with (a file without it is 1)",
        since=2,
        before=1,
    ),
)
COLUMN_TYPES = {c.name: c.type for c in COLUMNS}
CASE_KEY = tuple(c.name for c in COLUMNS if c.key)


def markdown_table() -> str:
    """The columns as the Markdown table of this module's docstring (and of the README's schema)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for c in COLUMNS:
        since = f" (since {c.since})" if c.since > 1 else ""
        lines.append(f"| {c.name} | {c.type.__name__} | {c.meaning}{since} |")
    return "\n".join(lines)


__doc__ = __doc__.format(version=SCHEMA_VERSION, columns=markdown_table())


# --- a case, and its row -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One measurement: an implementation (or a floor) on one problem size, for one pass."""

    implementation: str
    device: str
    dtype: str
    batch: int
    classes: int
    smoothing: float
    pass_: Pass
    ignore_fraction: float = 0.0  # of the targets, set to IGNORE_INDEX
    weighted: bool = False  # class weights on
    threads: int | None = None  # torch's intra-op threads; None: whatever torch has when it runs
    hidden: int = 0  # a head case's H (`lsr.heads`): batch is then its tokens, classes its vocabulary

    def key(self) -> tuple:
        return case_key(self.as_dict())

    @property
    def is_floor(self) -> bool:
        return self.implementation in ALL_FLOORS

    @property
    def is_head(self) -> bool:
        return self.hidden > 0

    def as_dict(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        return row

    @classmethod
    def of_row(cls, row: dict) -> Case:
        return cls(*case_key(row))


def floor_for(implementation) -> str:
    """The floor an implementation (a registry entry or its name) is a multiple of: FLOOR for one that
    writes its gradient over the logits (`Implementation.overwrites_logits`), FLOOR_ALLOC for every
    other, and for a name the registry does not know. A floor's floor is itself.

    Example:
        >>> floor_for("fused-exact-inplace"), floor_for("native"), floor_for(FLOOR), floor_for("unknown")
        ('floor', 'floor-alloc', 'floor', 'floor-alloc')
        >>> floor_for("head-exact")
        'floor-gemm'
    """
    from lsr.heads import HEAD_REGISTRY  # the schema is read by tools that need no loss: imported late
    from lsr.registry import REGISTRY

    name = implementation if isinstance(implementation, str) else implementation.name
    if name in ALL_FLOORS:
        return name
    if name in HEAD_REGISTRY:
        return FLOOR_GEMM
    impl = REGISTRY.get(name) if isinstance(implementation, str) else implementation
    return FLOOR if impl is not None and impl.overwrites_logits else FLOOR_ALLOC


def case_key(row: dict) -> tuple:
    """What identifies a case in a results row: two rows with one key measured the same thing."""
    return tuple(row[column] for column in CASE_KEY)


def new_row(case: Case, smoothing_kind: str) -> dict:
    """A results row for `case` before anything is measured: every column, status ok until told otherwise."""
    logits_bytes = case.batch * case.classes * DTYPES[case.dtype].itemsize
    row = dict.fromkeys(COLUMN_TYPES) | case.as_dict()
    return row | {
        "smoothing_kind": smoothing_kind,
        "logits_bytes": logits_bytes,
        "timer": "perf_counter",
        "status": "ok",
        "message": "",
        "machine": "",
        "schema_version": SCHEMA_VERSION,
    }


# --- the machine column -------------------------------------------------------------------------------

# A CPU model's first word that names its family (the rest, the exact part, is recorded apart).
_CPU_FAMILIES = ("epyc", "xeon", "ryzen", "core", "neoverse", "graviton")


def machine_name_of(model: str, cpu_count: int | None, isa: str) -> str:
    """`machine_name` of a machine described by its CPU model, logical CPU count and vector ISA (as
    metadata.json records them): what results older than the machine column are tagged with.

    Example:
        >>> machine_name_of("AMD EPYC 7B13 64-Core Processor", 2, "avx2")
        'epyc-2c-avx2'
    """
    model = model.lower()
    family = next((name for name in _CPU_FAMILIES if name in model), None)
    if family is None:
        words = re.findall(r"[a-z0-9]+", model)
        family = words[0] if words else "cpu"
    return f"{family}-{cpu_count}c-{isa}"


def busy_rows(rows: list[dict]) -> list[dict]:
    """The rows timed while other processes used more than BUSY_LOAD of the machine."""
    return [row for row in rows if row.get("busy")]
