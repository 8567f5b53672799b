"""The package's shape, enforced so that later work inherits it: no module over MAX_LINES lines, no
import cycle, and no branch or dict key on a specific registry name outside `lsr/registry.py`
(facts about an implementation are its `Implementation` fields; tests ask a capability flag)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lsr
import lsr.heads
from lsr.types import SMOOTHING_KINDS

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
MAX_LINES = 400


def python_files(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in folder.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", python_files(SOURCE / "lsr"), ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_module_is_over_the_line_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by job"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports, anywhere in it (function-local and type-checking
    imports included: a cycle through them is still a cycle). `from pkg import sub` counts as an
    import of the submodule pkg.sub where there is one, else of pkg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in python_files(SOURCE / "lsr")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first = last), or None. A package imports its own
    submodules to re-export them: that edge goes down the tree, and a submodule importing its own
    package back would be the cycle."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    # The top-level package re-exports the registry, which every layer reads: edges into "lsr"
    # itself are imports of that facade, not of a layer above.
    graph = {name: {m for m in deps if m != "lsr"} for name, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_bench_layers_import_downwards_only():
    """data <- measure <- sweep <- report <- cli: a layer imports only the layers below it."""
    layers = ["data", "measure", "sweep", "report", "cli"]
    rank = {f"lsr.bench.{layer}": i for i, layer in enumerate(layers)}

    def layer_of(module: str) -> int | None:
        return next(
            (r for prefix, r in rank.items() if module == prefix or module.startswith(prefix + ".")), None
        )

    wrong = [
        f"{name} imports {dep}"
        for name, deps in import_graph().items()
        for dep in deps
        if layer_of(name) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(name)
    ]
    assert not wrong, wrong


def is_name_attribute(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "name"


def branches_on_names(path: Path, names: set[str], strict: bool) -> list[str]:
    """Where `path` branches on a registry name: `x.name` compared with a registry name, or tested
    with `.startswith`; with `strict` (the package's own code), also any comparison with, and any
    dict keyed by, a registry name. Names that are also smoothing kinds ("sparse") count only in
    `x.name` comparisons. Each with its line number."""
    plain = names - set(SMOOTHING_KINDS)
    found = []

    def hit(literal: ast.AST, among: set[str]) -> None:
        if isinstance(literal, ast.Constant) and literal.value in among:
            found.append(f"{path.relative_to(ROOT)}:{literal.lineno}: {literal.value!r}")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            literals = [
                e
                for o in operands
                for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])
            ]
            among = names if any(map(is_name_attribute, operands)) else plain if strict else set()
            for literal in literals:
                hit(literal, among)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "startswith" and is_name_attribute(node.func.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .name.startswith(...)")
        elif isinstance(node, ast.Dict) and strict:
            for key in node.keys:
                if key is not None:
                    hit(key, plain)
    return found


def test_no_branch_on_a_registry_name_outside_the_registry():
    names = set(lsr.REGISTRY) | set(lsr.heads.HEAD_REGISTRY)
    registries = {SOURCE / "lsr" / "registry.py", SOURCE / "lsr" / "heads.py"}
    package = [p for p in python_files(SOURCE / "lsr") if p not in registries]
    found = [hit for path in package for hit in branches_on_names(path, names, strict=True)]
    others = python_files(ROOT / "tests", ROOT / "benchmarks")
    found += [hit for path in others for hit in branches_on_names(path, names, strict=False)]
    assert not found, "ask an Implementation field instead:\n" + "\n".join(found)


def test_the_name_rule_finds_branches():
    path = ROOT / "tests" / "_rule_probe.py"
    try:
        path.write_text(
            'if impl.name == "sparse": pass\nif impl.name.startswith("fused"): pass\nx = {"dense": 4.0}\n'
        )
        assert len(branches_on_names(path, {"sparse", "dense"}, strict=True)) == 3
        assert len(branches_on_names(path, {"sparse", "dense"}, strict=False)) == 2
    finally:
        path.unlink()
