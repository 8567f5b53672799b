"""Every code block of the README and docs/ as a reader would use it: each Python block runs as
written, on its own (`<!-- run: torchrun K -->` before it: under torchrun with K ranks); each shell
command is checked in a dry mode (an `lsr-bench` command is parsed by its own parser, a nox session
must exist, an install's extras must be declared, a module must import, a path must exist), or its
block says before it why it is not run (`<!-- not run: REASON -->`). Blocks fenced as `text` are
listings, not code."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
import tomllib

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*(?P<note>[^>]*?)\s*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def blocks(language: set[str]) -> list:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            if m["lang"] in language:
                line = text[: m.start("code")].count("\n") + 1
                found.append(pytest.param(m["code"], m["note"] or "", id=f"{path.name}:{line}"))
    return found


@pytest.mark.parametrize("code, note", blocks({"python"}))
def test_python_block_runs_as_written(code, note, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    ranks = re.fullmatch(r"run: torchrun (\d+)", note)
    command = [sys.executable, str(script)]
    if ranks:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", ranks[1], str(script)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def commands(code: str, language: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped; in a console
    block only the lines after a `$ ` prompt."""
    joined = code.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        if language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return [part.strip() for line in lines for part in line.split("&&")]


def nox_sessions() -> set[str]:
    return set(re.findall(r"^def (\w+)\(session", (ROOT / "noxfile.py").read_text(), re.M))


def extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_command(command: str) -> None:
    """Dry-check one command, or fail saying it cannot be checked."""
    from lsr.bench.cli import build_parser

    words = shlex.split(command)
    if words[0] == "torchrun":  # its own options, then -m MODULE ARGS
        words = ["python", *words[words.index("-m") :]]
    if words[0] == "lsr-bench" or words[:3] in (
        ["python", "-m", "lsr.bench"],
        ["python3", "-m", "lsr.bench"],
    ):
        argv = words[1:] if words[0] == "lsr-bench" else words[3:]
        build_parser().parse_args(argv)  # exits (SystemExit) on a bad option or value
        return
    if words[0] in ("python", "python3") and words[1:3] == ["-m", "nox"] or words[0] == "nox":
        session = words[words.index("-s") + 1]
        assert session in nox_sessions(), f"no nox session {session!r}"
        return
    if words[0] in ("python", "python3") and words[1] == "-m" and words[2].startswith("lsr"):
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
        return
    if words[0] in ("pip", "python3", "python") and "install" in words:
        for spec in words:
            if spec.startswith(".["):
                wanted = set(spec[2:-1].split(","))
                assert wanted <= extras(), f"extras {wanted - extras()} are not declared"
        return
    if words[:3] == ["python3", "-m", "venv"] or words[0] in (".", "source"):
        return
    if words[0] == "pytest":
        assert (ROOT / words[1]).exists(), f"no {words[1]}"
        return
    raise AssertionError(f"cannot dry-check {command!r}: say why it is not run (<!-- not run: ... -->)")


@pytest.mark.parametrize("code, note", blocks({"bash", "sh", "console"}))
def test_shell_block_is_checked_or_says_why_not(code, note):
    if note.startswith("not run:"):
        assert len(note) > len("not run:") + 10, "say why it is not run"
        return
    language = "console" if any(line.startswith("$ ") for line in code.splitlines()) else "bash"
    for command in commands(code, language):
        check_command(command)


def test_the_checks_catch_a_wrong_command():
    with pytest.raises(SystemExit):
        check_command("lsr-bench run --batch 0")
    with pytest.raises(AssertionError, match="nox session"):
        check_command("python3 -m nox -s nonsense")
    with pytest.raises(AssertionError, match="extras"):
        check_command("pip install -e '.[nonsense]'")
    with pytest.raises(AssertionError, match="not run"):
        check_command("rm -rf results")
