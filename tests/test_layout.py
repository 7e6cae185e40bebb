"""The layout the design promises (README "Where things are"), checked on the source: the core names
no plugin or tool, no plugin imports another, tools do not import each other, and no two modules
import each other at import time (a circle)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
PLUGINS = {"specrun_torch_cuda", "specrun_onnx_cpu", "specrun_openvino", "specrun_llama_cpp"}
TOOLS = {"specrun_bench", "specrun_train", "specrun_conformance", "specrun_server", "specrun_cache"}
# a benchmark script may import the tool it measures (bench/data_engine.py times train-draft's data stage,
# bench/eagle3_vocab.py reads its data, bench/eagle3_heldout.py runs its held-out estimate on finished heads)
MEASURES = {"specrun_bench.data_engine": {"specrun_train"}, "specrun_bench.eagle3_vocab": {"specrun_train"},
            "specrun_bench.eagle3_heldout": {"specrun_train"}}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """First-party modules ``name`` imports (all of them, or only those run at import time)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                if top or not top_level_only:
                    found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if top or not top_level_only:
                    base = child.module or ""
                    if child.level:
                        anchor = name.split(".")
                        anchor = anchor[: len(anchor) - child.level + (1 if is_pkg else 0)]
                        base = ".".join(anchor + ([base] if base else []))
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in child.names)
            elif isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue  # annotations only
            else:
                inside = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                visit(child, top and not inside)

    visit(tree, True)
    return found


MODULES = modules()


def first_party(found: set[str]) -> set[str]:
    return {m for m in found if m in MODULES}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] == "specrun"))
def test_the_core_names_no_plugin_tool_or_kit(name):
    # nor the kit: it is built on the core (imports run down: tools and plugins -> kit -> core)
    bad = {m for m in imports(name, MODULES[name], top_level_only=False)
           if m.split(".")[0] in PLUGINS | TOOLS | {"specrun_kit"}}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.split(".")[0] in PLUGINS | TOOLS))
def test_plugins_and_tools_do_not_import_each_other(name):
    own = name.split(".")[0]
    bad = {m for m in imports(name, MODULES[name], top_level_only=False)
           if m.split(".")[0] in PLUGINS | TOOLS and m.split(".")[0] != own
           and m.split(".")[0] not in MEASURES.get(name, ())}
    assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_circles():
    graph = {n: first_party(imports(n, p, top_level_only=True)) - {n} for n, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages expose them, not a circle
    for n in graph:
        graph[n] = {m for m in graph[n] if not (m.startswith(n + ".") and MODULES[n].name == "__init__.py")}
    circles = []
    state: dict[str, int] = {}

    def walk(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                circles.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                walk(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            walk(n, [n])
    assert not circles, f"import circles: {circles[:3]}"


def test_the_checker_sees_imports():
    """The checks above would see a violation: the CLI imports the registry, a backend the kit."""
    assert "specrun.plugins" in first_party(imports("specrun.cli", MODULES["specrun.cli"], top_level_only=False))
    assert any(m.startswith("specrun_kit") for n in MODULES if n.startswith("specrun_onnx_cpu")
               for m in imports(n, MODULES[n], top_level_only=False))
