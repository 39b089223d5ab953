"""The package's import graph, read with `ast` (nothing is executed): no circles, and no
function-local import of a project module unless its line says why it is deferred."""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "glm_jax"
DEFERRED = "# deferred:"  # the comment a function-local project import must carry, with its reason


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def with_parents(name: str, known) -> set[str]:
    """Importing a.b.c runs a, a.b and a.b.c: every package on the way is an edge too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(known)


def imports(path: pathlib.Path, known) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        names = set().union(*(with_parents(t, known) for t in targets)) if targets else set()
        for name in names:
            found.append((name, node.lineno, id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _, _ in imports(path, known) if m != name} - {"glm_jax"} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    edges = graph()
    assert len(edges) > 20 and "glm_jax.model" in edges["glm_jax.pipeline"]  # the walk sees the package
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_stray_local_import_of_a_project_module():
    known = modules()
    stray = []
    for name, path in known.items():
        lines = path.read_text().splitlines()
        for module, line, at_top in imports(path, known):
            if not at_top and module != "glm_jax" and DEFERRED not in lines[line - 1]:
                stray.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not stray, "function-local imports of project modules (import at the top, or say `# deferred: why`):\n" + (
        "\n".join(sorted(set(stray)))
    )


def test_no_libtpu_noise_without_a_tpu():
    """libtpu (the test extra) is not probed on a machine without a TPU: its start-up errors
    would read as a failed run."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu absent: nothing would print")
    if any(open(v).read().strip() == "0x1ae0" for v in pathlib.Path("/sys/bus/pci/devices").glob("*/vendor")):
        pytest.skip("this machine has a TPU")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import glm_jax, jax; print(jax.devices()[0].platform)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "E0000" not in run.stderr and "TPU_WORKER_HOSTNAMES" not in run.stderr, run.stderr
