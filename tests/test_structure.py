"""The package's structure: every module imports on its own, and imports form no circle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "llama"
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
                 if p.name != "__init__.py" or p.parent != PACKAGE)
MODULES = [m[: -len(".__init__")] if m.endswith(".__init__") else m for m in MODULES]
LAZY = {"llama.kernels.triton_kernels", "llama.kernels.ahead"}  # needs Triton; imported by llama.kernels on first use on CUDA


def imports_of(module: str):
    """The llama modules `module` imports at its top level (names from `from llama import x` too)."""
    path = REPO / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llama"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llama"))
    return {m for m in found if m in MODULES and m != module}


def test_no_import_circle():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])


def test_no_imports_inside_functions():
    """Imports of llama modules sit at the top of each module, where the graph shows them."""
    offenders = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("llama"):
                        offenders.append(f"{p.relative_to(REPO)}:{inner.lineno}")
    assert offenders == []


@pytest.mark.slow
def test_every_module_imports_alone():
    for m in MODULES:
        if m in LAZY:
            continue
        res = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({m!r})"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 0, f"{m}: {res.stderr[-2000:]}"
