"""Sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`.

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
    """The test suite; Triton kernels run on CPU under TRITON_INTERPRET=1."""
    session.install(*PINNED, "-e", ".[tests,triton,benchmarking,experiments]")
    session.run("pytest", *(session.posargs or ["-q"]), env={"TRITON_INTERPRET": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Compare the losses on random logits, and show the seed snippet's sign error."""
    session.install(*PINNED, "-e", ".")
    session.run("python", "-m", "lsr.demo", *session.posargs)
