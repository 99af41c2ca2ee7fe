"""dvc.yaml's code deps are what each stage imports (`clipshield deps` writes them): a change to any module a stage
runs makes DVC rerun it, and a stage that does not train does not import the training loop."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from clipshield.deps import DepsError, closure, imported_modules, module_files, stage_deps, write_deps

ROOT = Path(__file__).resolve().parents[1]
STAGES = stage_deps(yaml.safe_load((ROOT / "dvc.yaml").read_text()), ROOT)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_every_module_a_stage_imports(stage):
    code, deps = STAGES[stage]
    for path in code:
        assert path in deps, (f"stage {stage} runs {path} (its script imports it, directly or not) but dvc.yaml does "
                              f"not list it in the stage's deps: run `clipshield deps` and commit dvc.yaml")
    for path in deps:
        assert path in code or not path.startswith(("stages/", "src/")), (
            f"stage {stage} lists {path} in its deps in dvc.yaml but does not import it: run `clipshield deps`")


def import_chain(script: Path, target: Path) -> list[str]:
    """The shortest chain of imports from `script` to the module file `target`."""
    modules = module_files(ROOT / "src")
    came_from = {m: None for m in imported_modules(script, None, modules)}
    todo = sorted(came_from)
    while todo:
        name = todo.pop(0)
        if modules[name] == target:
            chain = [name]
            while came_from[chain[-1]]:
                chain.append(came_from[chain[-1]])
            return [script.relative_to(ROOT).as_posix(), *reversed(chain)]
        for imported in sorted(imported_modules(modules[name], name, modules) - set(came_from)):
            came_from[imported] = name
            todo.append(imported)
    return []


@pytest.mark.parametrize("stage", ["data", "synth", "poison", "baseline", "robust", "report"])
def test_a_stage_that_does_not_train_does_not_import_the_training_loop(stage):
    chain = import_chain(ROOT / "stages" / f"{stage}.py", ROOT / "src/clipshield/training.py")
    assert not chain, f"stage {stage} trains nothing but imports the training loop: {' -> '.join(chain)}"


def test_every_stage_that_loads_a_model_depends_on_the_model_code():
    for stage in ["pretrain", "baseline", "backdoor", "clean", "robust", "harden"]:
        assert {"src/clipshield/models.py", "src/clipshield/configs"} <= set(STAGES[stage][0]), stage
    assert "src/clipshield/data/concepts.yaml" in STAGES["synth"][0]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_closure_follows_every_kind_of_import_and_package_data(tmp_path):
    write(tmp_path, {
        "stages/run.py": "from pkg.a import go\n",
        "src/pkg/__init__.py": "",
        "src/pkg/a.py": """
            from . import b
            from .sub import c
            def go():
                import pkg.late
            """,
        "src/pkg/b.py": "from .a import go  # a cycle: a -> b -> a\n",
        "src/pkg/sub/__init__.py": "from ..e import E\n",
        "src/pkg/sub/c.py": """
            from pathlib import Path
            from typing import TYPE_CHECKING
            TABLE = Path(__file__).parent / "table.json"
            if TYPE_CHECKING:
                from pkg import typing_only
            """,
        "src/pkg/sub/table.json": "{}",
        "src/pkg/e.py": "import os\nfrom pkg.sub.c import TABLE\n",
        "src/pkg/late.py": "",
        "src/pkg/typing_only.py": "",
        "src/pkg/unused.py": "",
    })
    assert closure(tmp_path / "stages/run.py", tmp_path) == [
        "src/pkg/__init__.py", "src/pkg/a.py", "src/pkg/b.py", "src/pkg/e.py", "src/pkg/late.py",
        "src/pkg/sub/__init__.py", "src/pkg/sub/c.py", "src/pkg/sub/table.json", "stages/run.py"]


def test_a_package_data_constant_not_followed_is_one_clear_error(tmp_path):
    write(tmp_path, {"stages/run.py": "import pkg\n",
                     "src/pkg/__init__.py": "import os\nHERE = os.path.dirname(__file__)\n"})
    with pytest.raises(DepsError, match=r"src/pkg/__init__.py line 2: cannot tell which file .* Path\(__file__\)"):
        closure(tmp_path / "stages/run.py", tmp_path)


DVC_YAML = """\
stages:
  make:
    cmd: python stages/run.py --out out
    deps:
      - stages/old.py
      - data/in
      - src/pkg/gone.py
      - ${item.data}
    outs:
      - out

  each:
    foreach: ${runs}
    do:
      cmd: >-
        python stages/run.py ${key}
        --out out/${key}
      deps:
        - data/${item.start}
      outs:
        - out/${key}

# a comment that must stay
artifacts:
  m:
    path: out
    labels:
    - a:b
"""


def test_write_deps_replaces_the_code_entries_in_place_and_is_stable(tmp_path):
    write(tmp_path, {"stages/run.py": "import pkg\n", "src/pkg/__init__.py": "", "dvc.yaml": DVC_YAML})
    with pytest.raises(DepsError, match="the code deps of make, each are not what the stages import"):
        write_deps(tmp_path / "dvc.yaml", check=True)
    assert write_deps(tmp_path / "dvc.yaml") == ["make", "each"]
    text = (tmp_path / "dvc.yaml").read_text()
    assert text == DVC_YAML.replace(
        "      - stages/old.py\n      - data/in\n      - src/pkg/gone.py\n",
        "      - src/pkg/__init__.py\n      - stages/run.py\n      - data/in\n").replace(
        "      deps:\n        - data/", "      deps:\n        - src/pkg/__init__.py\n        - stages/run.py\n"
                                       "        - data/")
    assert write_deps(tmp_path / "dvc.yaml") == [] and (tmp_path / "dvc.yaml").read_text() == text


def test_a_stage_without_a_script_is_one_clear_error(tmp_path):
    write(tmp_path, {"dvc.yaml": "stages:\n  report:\n    cmd: clipshield report\n    deps:\n      - metrics\n"})
    with pytest.raises(DepsError, match=r"stage report runs `clipshield report`; .* `python stages/NAME.py"):
        write_deps(tmp_path / "dvc.yaml")


def test_deps_written_inline_are_one_clear_error(tmp_path):
    write(tmp_path, {"stages/run.py": "", "dvc.yaml": "stages:\n  make:\n    cmd: python stages/run.py\n"
                                                      "    deps: [stages/run.py, data/in]\n"})
    with pytest.raises(DepsError, match=r"could not rewrite the deps lists in place .* one `- PATH` a line"):
        write_deps(tmp_path / "dvc.yaml")
