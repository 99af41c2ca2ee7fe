"""`clipshield deps`: each DVC stage's code dependencies in dvc.yaml, computed from what the stage imports.

A stage's code is its entry script (the `python stages/NAME.py` of its cmd) and every module under src/ that the
script imports, directly or not: absolute and relative imports, at module level or inside functions (they run), and
the package `__init__.py` of every imported submodule; imports under `if TYPE_CHECKING:` never run and are left
out. To it belong the package data those modules read: a module names each file or folder it reads next to it in a
module-level constant built from `Path(__file__)` (models.CONFIG_DIR, data/synth.BANK_PATH).

The command replaces the code entries of every stage's deps (paths under stages/ and src/) with that closure,
sorted, and leaves the data deps as they are; the rest of dvc.yaml is kept byte for byte.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

CODE_PREFIXES = ("stages/", "src/")
ENTRY = re.compile(r"(?:^|[\s;&|(])python3?\s+(\S+\.py)(?=\s|$)")


class DepsError(ValueError):
    pass


def module_files(src: Path) -> dict[str, Path]:
    """Every module under `src` (the import root) by dotted name; a package by its __init__.py."""
    modules = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The dotted names a file imports (modules, and `from M import x` as M and M.x), anywhere but under
    `if TYPE_CHECKING:`."""

    def __init__(self, package: str | None):
        self.package, self.names = package, set()

    def visit_If(self, node: ast.If) -> None:
        if _type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names |= {a.name for a in node.names}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            if self.package is None:  # a script: Python itself refuses a relative import there
                return
            parts = self.package.split(".")
            base = parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])
        else:
            base = [node.module]
        module = ".".join(base)
        self.names |= {module} | {f"{module}.{a.name}" for a in node.names}


def imported_modules(path: Path, name: str | None, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the file `path` (module `name`, None for a script) imports, with the
    packages above each (their __init__.py runs first)."""
    package = None if name is None else name if path.name == "__init__.py" else name.rpartition(".")[0]
    visitor = _Imports(package)
    visitor.visit(ast.parse(path.read_text(), str(path)))
    found = set()
    for imported in visitor.names:
        parts = imported.split(".")
        found |= {m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules}
    return found - {name}


def _resolve(node: ast.expr, file: Path) -> Path | None:
    """The path a `Path(__file__)` expression names; None if it is written in a way not followed here."""
    match node:
        case ast.Call(func=ast.Name(id="Path"), args=[ast.Name(id="__file__")], keywords=[]):
            return file
        case ast.Call(func=ast.Attribute(value=inner, attr="resolve"), args=[], keywords=[]):
            return _resolve(inner, file)
        case ast.Attribute(value=inner, attr="parent"):
            base = _resolve(inner, file)
            return base and base.parent
        case ast.Subscript(value=ast.Attribute(value=inner, attr="parents"), slice=ast.Constant(value=int() as n)):
            base = _resolve(inner, file)
            return base and base.parents[n]
        case ast.BinOp(left=inner, op=ast.Div(), right=ast.Constant(value=str() as part)):
            base = _resolve(inner, file)
            return base and base / part
        case ast.Call(func=ast.Attribute(value=inner, attr="with_name"), args=[ast.Constant(value=str() as part)]):
            base = _resolve(inner, file)
            return base and base.with_name(part)
    return None


def package_data(path: Path, root: Path) -> set[Path]:
    """The files and folders that module `path` names in module-level constants built from Path(__file__)."""
    found = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if value is None or not any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(value)):
            continue
        where = f"{path.relative_to(root)} line {node.lineno}"
        target = _resolve(value, path)
        if target is None:
            raise DepsError(f"{where}: cannot tell which file `{ast.unparse(value)}` names; write it as "
                            f"Path(__file__).parent / \"NAME\" or Path(__file__).with_name(\"NAME\")")
        if not target.exists():
            raise DepsError(f"{where}: `{ast.unparse(value)}` names {target.relative_to(root)}, which does not "
                            f"exist; create it or fix the constant")
        found.add(target)
    return found


def closure(script: Path, root: Path) -> list[str]:
    """The code a script runs: itself, every module under root/src it imports directly or not, and their package
    data; sorted paths relative to `root`."""
    modules = module_files(root / "src")
    seen: set[str] = set()
    todo = imported_modules(script, None, modules)
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= imported_modules(modules[name], name, modules) - seen
    files = {script} | {modules[m] for m in seen}
    data = set().union(*(package_data(f, root) for f in files))
    return sorted(p.relative_to(root).as_posix() for p in files | data)


def entry_script(stage: str, cmd, root: Path) -> Path:
    """The script a stage's cmd runs with python."""
    text = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    match = ENTRY.search(text)
    if not match:
        raise DepsError(f"stage {stage} runs `{text}`; `clipshield deps` follows stages that run "
                        f"`python stages/NAME.py ...`: give the stage such a script")
    script = root / match.group(1)
    if not script.is_file():
        raise DepsError(f"stage {stage} runs {match.group(1)}, which does not exist")
    return script


def is_code(dep: str) -> bool:
    return dep.startswith(CODE_PREFIXES)


def stage_deps(dvc: dict, root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (its code closure, the deps dvc.yaml lists for it) for every stage of a parsed dvc.yaml."""
    out = {}
    for stage, spec in (dvc.get("stages") or {}).items():
        body = spec.get("do", spec)  # foreach stages keep their definition under `do:`
        if "deps" not in body:
            raise DepsError(f"stage {stage} in dvc.yaml has no `deps:` list; add `deps:` (with its data inputs, if "
                            f"any) and run `clipshield deps` again")
        out[stage] = (closure(entry_script(stage, body.get("cmd", ""), root), root), list(body["deps"] or []))
    return out


def _stage_spans(lines: list[str]) -> dict[str, tuple[int, int]]:
    """stage -> (first, end) line indices of its block under the top-level `stages:` key."""
    top = next((i for i, line in enumerate(lines) if line.rstrip() == "stages:"), len(lines))
    spans, indent, stage, first, end = {}, None, None, top, len(lines)
    for i in range(top + 1, len(lines)):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            continue
        depth = len(lines[i]) - len(lines[i].lstrip())
        if depth == 0:  # the next top-level key
            end = i
            break
        indent = depth if indent is None else indent
        if depth == indent:
            if stage is not None:
                spans[stage] = (first, i)
            stage, first = next(iter(yaml.safe_load(lines[i]))), i
    if stage is not None:
        spans[stage] = (first, end)
    return spans


def rewrite(text: str, closures: dict[str, list[str]]) -> str | None:
    """dvc.yaml's text with the code entries of each stage's deps replaced by `closures[stage]` (first, sorted),
    its data entries kept in their order, every other line unchanged; None if a stage is not laid out so."""
    lines = text.splitlines(keepends=True)
    spans = _stage_spans(lines)
    if set(closures) - set(spans):
        return None
    for stage in sorted(closures, key=lambda s: spans[s][0], reverse=True):  # bottom up: indices stay valid
        first, end = spans[stage]
        key = next((i for i in range(first, end) if lines[i].strip() == "deps:"), None)
        if key is None:
            return None
        items = key + 1
        while items < end and lines[items].lstrip().startswith("- "):
            items += 1
        under = lines[key + 1] if items > key + 1 else "  " + lines[key]  # an empty list: one step under `deps:`
        indent = under[:len(under) - len(under.lstrip())]
        data = [line for line in lines[key + 1:items] if not is_code(str(yaml.safe_load(line.strip()[2:])))]
        lines[key + 1:items] = [f"{indent}- {path}\n" for path in closures[stage]] + data
    return "".join(lines)


def write_deps(dvc_yaml: str | Path = "dvc.yaml", check: bool = False) -> list[str]:
    """Write each stage's code closure into the deps of `dvc_yaml` (with `check`: write nothing, refuse stale
    deps); returns the stages whose deps changed."""
    path = Path(dvc_yaml)
    if not path.is_file():
        raise DepsError(f"{path} does not exist; run `clipshield deps` in the project's folder (where dvc.yaml is)")
    text = path.read_text()
    dvc = yaml.safe_load(text)
    found = stage_deps(dvc, path.resolve().parent)
    closures = {stage: code for stage, (code, _) in found.items()}
    stale = [stage for stage, (code, deps) in found.items() if [d for d in deps if is_code(d)] != code]
    new = rewrite(text, closures)
    for stage, (code, deps) in found.items():  # what the new text must parse to
        body = dvc["stages"][stage].get("do", dvc["stages"][stage])
        body["deps"] = code + [d for d in deps if not is_code(d)]
    if new is None or yaml.safe_load(new) != dvc:  # the text edit would touch more than the deps lists
        raise DepsError(f"{path}: could not rewrite the deps lists in place (each stage's `deps:` must be a block "
                        f"list, one `- PATH` a line); write them so and run `clipshield deps` again")
    if check and stale:
        raise DepsError(f"{path}: the code deps of {', '.join(stale)} are not what the stages import; run "
                        f"`clipshield deps` and commit dvc.yaml")
    if new != text and not check:
        path.write_text(new)
    return stale
