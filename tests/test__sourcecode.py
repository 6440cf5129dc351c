"""Lint and types as tests: ruff, mypy --strict on the Python layers,
cython-lint on the core, and the typed-proxy example."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from support import ROOT

BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def test_ruff():
    out = run(sys.executable, "-m", "ruff", "check", "malla", "tests", "examples", "bench", "fuzz")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict():
    out = run(sys.executable, "-m", "mypy")
    assert out.returncode == 0, out.stdout + out.stderr
    # and strict on the package alone, as a user's `mypy --strict` sees it
    out = run(sys.executable, "-m", "mypy", "--strict", "malla")
    assert out.returncode == 0, out.stdout + out.stderr


def test_cython_lint():
    fragments = sorted(glob.glob(os.path.join(ROOT, "malla", "core", "*.p*")))
    assert fragments, "the core's fragments are in malla/core/"
    out = run(os.path.join(BIN, "cython-lint"), "--max-line-length", "100",
              "malla/_core.pyx", "malla/_core.pxd", *fragments)
    assert out.returncode == 0, out.stdout + out.stderr


def test_typed_proxy_example_passes_mypy():
    out = run(sys.executable, "-m", "mypy", "--strict", "examples/typed_client.py")
    assert out.returncode == 0, out.stdout + out.stderr


# The top layer composes the node; nothing below it may import malla.node.
_TOP = {"__init__", "__main__", "api", "cli", "demo", "facade", "node", "services", "testing"}


def _malla_imports() -> dict[str, set[str]]:
    """module -> the malla modules it imports, anywhere in the file
    (TYPE_CHECKING blocks and function bodies included)."""
    import ast
    import pathlib

    graph: dict[str, set[str]] = {}
    for path in sorted(pathlib.Path(ROOT, "malla").glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "malla" and len(parts) > 1 and (
                        pathlib.Path(ROOT, "malla", parts[1] + ".py").exists()):
                    deps.add(parts[1])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_the_import_graph_of_malla_has_no_cycle():
    graph = _malla_imports()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*trail, module, dep])}"
            if dep not in state:
                visit(dep, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    below = sorted(m for m, deps in graph.items() if "node" in deps and m not in _TOP)
    assert below == [], f"modules below the node facade import it: {below}"


def _class_lengths() -> dict[str, int]:
    """'file:Class' -> lines, for every class of malla/ (the core's
    fragments included): from its header to its last indented line."""
    import pathlib
    import re

    sizes: dict[str, int] = {}
    paths = [*pathlib.Path(ROOT, "malla").glob("*.py"),
             *pathlib.Path(ROOT, "malla", "core").glob("*.pyx")]
    for path in paths:
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"(?:cdef )?class (\w+)", line)
            if not m:
                continue
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
                end += 1
            while not lines[end - 1].strip() or lines[end - 1].startswith("#"):
                end -= 1
            sizes[f"{path.name}:{m.group(1)}"] = end - i
    return sizes


def test_no_class_is_a_god_class():
    sizes = _class_lengths()
    assert "protocol.pyx:CoreProtocol" in sizes and "node.py:Node" in sizes
    assert {k: n for k, n in sizes.items() if n > 500} == {}
    assert sizes["node.py:Node"] <= 300, sizes["node.py:Node"]
