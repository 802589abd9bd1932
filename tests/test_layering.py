"""The package's architecture, checked: imports run one way, low to high, and no two files
import each other (shared/DESIGN.md, "Layout").

Every `import` and `from ... import` in `plait/` counts, also those inside functions: a lazy
import still ties the lower module to the higher one.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plait"

LAYERS = {
    "plait.errors": 0,
    "plait.paths": 0,
    "plait.version": 0,
    "plait.http_guard": 0,
    "plait.console": 0,
    "plait.store": 1,
    "plait.backends": 2,
    "plait.retrievers": 3,
    "plait.modules": 4,
    "plait.pipelines": 5,
    "plait.compilers": 6,
    "plait.serve": 7,
    "plait.cli": 8,
    "plait.demo": 8,
    "plait": 8,
}
"""Top-level layers: a module may import its own layer and the ones below."""

BACKEND_LAYERS = {"grammar": 0, "kernels": 0, "models": 1, "loading": 2, "runtime": 3, "clients": 4}
"""Inside `plait.backends`: a model layer calls its kernel, a kernel never imports the model."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def rank(module: str) -> tuple[int, int]:
    parts = module.split(".")
    top = next(LAYERS[".".join(parts[:n])] for n in (2, 1) if ".".join(parts[:n]) in LAYERS)
    inner = BACKEND_LAYERS.get(parts[2], 0) if parts[:2] == ["plait", "backends"] and len(parts) > 2 else 0
    return top, inner


def imported_modules(path: Path) -> set[str]:
    """The plait modules a file imports (a `from package import submodule` names the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name == "plait" or name.startswith("plait.")}


GRAPH = {module: imported_modules(path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert len(MODULES) > 100
    for module in MODULES:
        rank(module)  # raises StopIteration for a top-level name with no layer


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if target != module and rank(target) > rank(module)
    )


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import path that leads a module back to itself (two files importing each other too)."""
    found = set()
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, trail = stack.pop()
            for target in graph.get(module, ()):
                if target == start:
                    found.add(" -> ".join([*trail, start]))
                elif target not in seen and target in graph:
                    seen.add(target)
                    stack.append((target, [*trail, target]))
    return sorted(found)


def test_imports_run_one_way_low_to_high():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_import_cycles():
    assert not cycles(GRAPH), "\n".join(cycles(GRAPH)[:20])


def test_the_checks_see_a_violation(tmp_path):
    """A lazy upward import and a two-file cycle are found (so the tests above can fail)."""
    lower = tmp_path / "lower.py"
    lower.write_text("def f():\n    from plait.serve.app import create_app\n")
    graph = {"plait.backends.models.state": imported_modules(lower)}
    assert upward_imports(graph) == ["plait.backends.models.state imports plait.serve.app"]
    assert upward_imports({"plait.backends.kernels.conv1d": {"plait.backends.models.mamba2"}})
    assert not upward_imports({"plait.backends.models.mamba2": {"plait.backends.kernels.conv1d"}})
    assert cycles({"plait.a": {"plait.b"}, "plait.b": {"plait.a"}})


def test_grammar_spec_imports_without_torch():
    """Callers that only build or send grammars (adapters, the server, the remote client) do
    not pay for torch or llguidance."""
    code = (
        "import sys, plait.backends.grammar.spec, plait.backends.grammar.tool_formats; "
        "print(sorted(m for m in ('torch', 'llguidance', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
