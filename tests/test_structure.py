"""The house read by its imports: every module of clipshield imports alone, and no chain of imports inside
clipshield (at module level or in a function) leads back to where it started."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted((SRC / "clipshield").rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The clipshield modules that module `name` imports anywhere in its file."""
    path = FILES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from .data import shards` imports the module clipshield.data.shards; `from .params import X` params
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in FILES else module for a in node.names}
    return {m for m in found if m in FILES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_find_cycle_finds_a_lazy_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_inside_clipshield_has_no_cycle():
    graph = {name: imported_modules(name) for name in FILES}
    assert "clipshield.params" in graph["clipshield.work.train"]  # the reading works
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Third-party packages are loaded once, then each clipshield module is imported in a fork that has loaded no
# clipshield module (a fresh interpreter per module would spend ~5 s of CPU on torch alone, 35 times).
IMPORT_EACH_ALONE = """
import importlib, os, sys, traceback
import open_clip, torch
assert not [m for m in sys.modules if m.startswith("clipshield")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("failed:", " ".join(failed))
"""


def test_every_module_imports_alone():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *FILES], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "failed:", r.stdout + r.stderr[-3000:]
