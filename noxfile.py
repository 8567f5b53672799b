"""Sessions: `nox -s bench`, `nox -s tests`, `nox -s lint`, `nox -s asv`, `nox -s pytest_benchmark`,
`nox -s experiments`, `nox -s demo`.

Every session installs torch from constraints.txt, the one place its version is pinned. nox keeps its
default virtualenv + pip backend: pip finds the pinned CPU build on local disk, uv would download GBs.
"""

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

PINNED = ("-c", "constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite; Triton kernels (lsr's and Liger-Kernel's, the `peers` extra) run on CPU under
    TRITON_INTERPRET=1."""
    session.install(*PINNED, "-e", ".[tests,triton,benchmarking,experiments,peers]")
    session.run("pytest", *(session.posargs or ["-q"]), env={"TRITON_INTERPRET": "1", "LSR_CPP": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The quick sweep on every present device, its charts and summary (arguments go to `lsr-bench run`)."""
    session.install(*PINNED, "-e", ".[benchmarking,triton]")
    session.run("lsr-bench", "run", *session.posargs)


# `asv continuous` fails the session when a benchmark is slower by more than this ratio (and asv
# calls the change significant). For an idle machine: two runs of one code on this 2-core host
# differed by up to 4x (9x for the smallest floor) while other jobs shared its cores, so compare on
# an idle machine (README, "History across commits"); peak bytes reproduce exactly.
ASV_FACTOR = "1.5"


@nox.session
def asv(session: nox.Session) -> None:
    """asv over commits under this host's machine name (`python -m lsr.bench.history machine`).

    nox -s asv                              # asv run HEAD^!, then asv publish (.asv/html)
    nox -s asv -- run --steps 8 ALL         # the backfill of results/asv
    nox -s asv -- continuous main HEAD      # fails when a benchmark slows by more than ASV_FACTOR
    """
    session.install(*PINNED, "-e", ".[benchmarking]")
    machine = (
        session.run("python", "-m", "lsr.bench.history", "machine", silent=True).strip().splitlines()[-1]
    )
    command, *rest = session.posargs or ["run", "HEAD^!"]
    if command in ("run", "continuous", "compare") and "--machine" not in rest:
        rest = ["--machine", machine, *rest]
    if command == "continuous" and not any(a.startswith(("--factor", "-f")) for a in rest):
        rest = ["--factor", ASV_FACTOR, *rest]
    session.run("asv", command, *rest)
    if command == "run":
        session.run("asv", "publish")
        session.run("python", "-m", "lsr.bench.history", "chart", "results/asv", "--out", "results/history")


@nox.session
def pytest_benchmark(session: nox.Session) -> None:
    """The pytest-benchmark suite; its JSON goes to .benchmarks/ and `lsr-bench plot` reads it."""
    session.install(*PINNED, "-e", ".[benchmarking,tests,triton]")
    session.run(
        "pytest", "benchmarks/pytest_suite", "--benchmark-json=.benchmarks/run.json", *session.posargs
    )
    session.run("lsr-bench", "plot", ".benchmarks/run.json", "--out", ".benchmarks/charts")


@nox.session
def experiments(session: nox.Session) -> None:
    """Loss shapes, SparseLSR's approximation error and the digits training run -> results/experiments/."""
    session.install(*PINNED, "-e", ".[experiments]")
    session.run("python", "-m", "lsr.experiments", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Compare the losses on random logits, and show the seed snippet's sign error."""
    session.install(*PINNED, "-e", ".")
    session.run("python", "-m", "lsr.demo", *session.posargs)
