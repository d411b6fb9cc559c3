"""The package's direction of flow, held by a test: no import cycle, no import upwards.

LAYERS is the one place the layering is declared (docs/ARCHITECTURE.md draws it). A module may
import modules of its own layer or of a lower one; an import of a higher layer, or any cycle
among the package's modules, fails here with the offending edge.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"vramplan": ROOT / "planner", "vramplan.validate": ROOT / "validate"}

# lowest first; a pattern names modules (fnmatch), the most specific pattern wins
LAYERS: list[tuple[str, ...]] = [
    ("vramplan.errors", "vramplan.base"),
    ("vramplan.config", "vramplan.quantized", "vramplan.request", "vramplan.source"),
    ("vramplan.result.vllm",),
    ("vramplan.result", "vramplan.result.training"),
    ("vramplan.catalog",),
    ("vramplan.model.spec",),
    ("vramplan.model.blocks", "vramplan.model.registry"),
    ("vramplan.model.families", "vramplan.model.families.*"),
    ("vramplan.model",),
    ("vramplan.loading",),
    ("vramplan.weights", "vramplan.parallel"),
    ("vramplan.runtimes.allocator",),
    ("vramplan.runtimes.transformers", "vramplan.runtimes.transformers.*"),
    ("vramplan.runtimes.vllm",),
    ("vramplan.runtimes.training", "vramplan.runtimes.training.*"),
    ("vramplan.runtimes",),
    ("vramplan.planning",),
    ("vramplan.render", "vramplan.plot"),
    ("vramplan.api_training",),
    ("vramplan",),
    ("vramplan.validate", "vramplan.validate.*"),
    ("vramplan.cli",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    base = module if _is_package(module) else module.rsplit(".", 1)[0]
    edges: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        edges |= {t for t in targets if t in MODULES and t != module}
    return edges


GRAPH = {module: _imports(module) for module in MODULES}


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, patterns in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern):
                specificity = len(pattern.replace("*", ""))
                if best is None or specificity > best[0]:
                    best = (specificity, index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_reaches_a_higher_layer():
    upward = upward_edges(GRAPH)
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    cycles = import_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_claim():
    """The graph is real (known edges are seen) and the checks fire on a bad graph."""
    assert "vramplan.model.spec" in GRAPH["vramplan.weights"]
    bad = {"vramplan.model.spec": {"vramplan.weights"}, "vramplan.weights": {"vramplan.model.spec"}}
    spec, weights = layer_of("vramplan.model.spec"), layer_of("vramplan.weights")
    assert upward_edges(bad) == [f"vramplan.model.spec (layer {spec}) imports vramplan.weights (layer {weights})"]
    assert import_cycles(bad) == [["vramplan.model.spec", "vramplan.weights"]]
    assert "vramplan.runtimes.allocator" in GRAPH["vramplan.runtimes.transformers.sequence"]
    assert layer_of("vramplan.model.families.llama") > layer_of("vramplan.model.blocks")


def test_no_module_over_500_lines():
    long = {m: n for m, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long
