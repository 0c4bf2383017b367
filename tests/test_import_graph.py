"""The import graph between bdm's packages, read from the source (every import statement, deferred ones included):
the bottom layer (bdm.errors, bdm.files, bdm.contract) imports no other bdm package, export imports neither runtime
nor cli, and no two packages import each other, directly or around a cycle. Prints the graph."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the `bdm` package
PACKAGES = ["bdm.export.base", "bdm.export.bidiffsr", "bdm.export.binarydm", "bdm.export", "bdm.runtime",
            "bdm.plugins", "bdm.cli"]
BOTTOM = "bdm (errors, files, contract)"
FACADE = "bdm (__init__: load_model)"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("bdm",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def node_of(module: str) -> str:
    """The package a module belongs to: one of PACKAGES, the bottom layer, or the package's own __init__."""
    if module == "bdm":
        return FACADE
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), BOTTOM)


def imported_modules(path: Path, module: str):
    """The bdm modules `path` imports; `from package import name` counts as the submodule when there is one."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "bdm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "bdm":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                folder = ROOT.joinpath(*candidate.split(".")[1:])
                yield candidate if folder.is_dir() or folder.with_suffix(".py").is_file() else base


def package_files():
    for path in sorted(ROOT.rglob("*.py")):
        top = path.relative_to(ROOT).parts[0]
        if top in ("tests", "tools", "build", "dist", ".venv") or top.endswith(".egg-info"):  # tools: not installed
            continue
        yield path


@pytest.fixture(scope="module")
def graph():
    """{package: {package it imports: [the importing modules]}}."""
    edges = {}
    for path in package_files():
        module = module_name(path)
        source = node_of(module)
        edges.setdefault(source, {})
        for target in map(node_of, imported_modules(path, module)):
            if target != source:
                edges[source].setdefault(target, set()).add(module)
    return edges


def find_cycle(edges):
    """One cycle as a list of packages, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, {})):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_print_the_graph(graph, capsys):
    with capsys.disabled():
        print("\n[import graph between bdm packages]")
        for source in sorted(graph):
            print(f"  {source} -> {', '.join(sorted(graph[source])) or '(nothing)'}")
    assert set(graph) >= set(PACKAGES) | {BOTTOM, FACADE}


def test_the_bottom_layer_imports_no_other_bdm_package(graph):
    assert graph[BOTTOM] == {}


def test_export_imports_neither_runtime_nor_cli(graph):
    for source in (p for p in PACKAGES if p.startswith("bdm.export")):
        offenders = {t: sorted(m) for t, m in graph[source].items() if t in ("bdm.runtime", "bdm.cli", FACADE)}
        assert not offenders, f"{source} imports {offenders}"


def test_no_import_cycle_between_packages(graph):
    cycle = find_cycle({source: set(targets) for source, targets in graph.items()})
    assert cycle is None, " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} in {sorted(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
