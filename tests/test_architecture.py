"""The package's imports run one way: maths <- heads/metrics <- runs -> files <- reports.

Truth: the source itself. Every ``import`` / ``from ... import`` of a ``guided_nc`` module is
read with :mod:`ast` (imports inside functions count too: a lazy import is still an arrow), and
the graph must have no circle, no arrow from a lower layer to a higher one, and no report module
that imports a run module. The checker is first shown to catch each defect on a made-up graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "guided_nc"

#: Layers from the bottom up; a module may import its own layer and those below it. A package
#: (models, data, reports, bench) is one group.
LAYERS = (
    (
        "foundations",
        {
            "_version",
            "_checks",
            "_guards",
            "catalog",
            "methods",
            "distributed",
            "progress",
            "runtime",
        },
    ),
    ("maths", {"etf"}),
    ("solvers", {"solvers"}),  # registers itself with etf: the arrow runs solvers -> etf
    (
        "library",
        {"settings", "heads", "nc_statistics", "metrics", "optim", "sampler", "models", "data"},
    ),
    ("files", {"runfiles", "checkpoint", "config"}),
    ("step", {"timing"}),
    ("runs", {"ufm", "train", "compare", "bench"}),
    ("reports", {"reports"}),
    ("interface", {"cli", "__init__"}),
)
MATHS = {"etf", "solvers", "settings", "heads", "nc_statistics", "metrics", "optim"}
RUNS = {"ufm", "train", "compare", "bench", "timing"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """``{module: {guided_nc modules it imports}}`` for every module of the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("guided_nc")}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: use absolute imports"
                if node.module and node.module.split(".")[0] == "guided_nc":
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        imported.add(full if _is_module(full) else node.module)
        graph[_module_name(path)] = imported
    return graph


def group(module: str) -> str:
    """The layer group of a module: ``guided_nc.reports.ufm`` -> ``reports``."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def layer_of(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if group(module) in members:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each."""
    problems = [f"circle: {' <-> '.join(c)}" for c in circles(graph)]
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if group(source) == group(target):
                continue
            if layer_of(target) > layer_of(source):
                low, high = LAYERS[layer_of(source)][0], LAYERS[layer_of(target)][0]
                problems.append(f"upward: {source} ({low}) imports {target} ({high})")
            if group(source) in MATHS and group(target) not in MATHS | LAYERS[0][1]:
                problems.append(f"maths imports the application: {source} -> {target}")
            if group(source) == "reports" and group(target) in RUNS:
                problems.append(f"a report imports a run: {source} -> {target}")
    return problems


def test_the_checker_catches_each_defect():
    made_up = {
        "guided_nc.etf": {"guided_nc.solvers"},  # upward, and a circle with the next line
        "guided_nc.solvers": {"guided_nc.etf"},
        "guided_nc.heads": {"guided_nc.runfiles"},  # maths -> application (also upward)
        "guided_nc.reports.ufm": {"guided_nc.ufm"},  # a report reading a run's code
        "guided_nc.ufm": set(),
        "guided_nc.runfiles": set(),
    }
    found = violations(made_up)
    assert any(line.startswith("circle: guided_nc.etf <-> guided_nc.solvers") for line in found)
    assert "upward: guided_nc.etf (maths) imports guided_nc.solvers (solvers)" in found
    assert "maths imports the application: guided_nc.heads -> guided_nc.runfiles" in found
    assert "a report imports a run: guided_nc.reports.ufm -> guided_nc.ufm" in found
    with pytest.raises(AssertionError, match="is in no layer"):
        layer_of("guided_nc.unknown")


def test_the_package_imports_run_one_way():
    graph = import_graph()
    assert {"guided_nc.etf", "guided_nc.cli", "guided_nc.reports.ufm"} <= set(graph)
    assert "guided_nc.solvers" not in graph["guided_nc.etf"]
    assert violations(graph) == []
