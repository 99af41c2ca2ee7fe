"""A new trigger and a new cleaning method are each one file plus one registration: in a copy of the repository, a
toy trigger and a toy method run through the smoke pipeline (poison -> backdoor -> clean -> report), and the
profile, the stages, the report and the CLI help pick them up from the registries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import copy_repo

BIN = Path(sys.executable).parent

TOY_TRIGGER = '''"""A toy trigger: a white square in the top-left corner."""
from .base import PIXELS, Trigger


def corner(images, seeds, side=3):
    out = images.clone()
    out[:, :, :side, :side] = 1.0
    return out


TOY = Trigger("toy", corner, ("side",), {"side": PIXELS})
'''

TOY_METHOD = '''"""A toy cleaning method: CLIP fine-tuning at the start model's temperature, the loss scaled by `weight`."""
from .clip import ClipObjective


class ToyObjective(ClipObjective):
    name = "toy_method"

    def __init__(self, weight: float = 0.5):
        super().__init__(fix_logit_scale=True)
        self.weight = weight

    def loss(self, features, clip):
        loss, logs = super().loss(features, clip)
        return self.weight * loss, logs
'''


def sh(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `cmd` in the copy, with the copy's code (src/, with the toy files) on the path of every process."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(cwd / "src"), "HF_HUB_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line)


@pytest.fixture(scope="module")
def toy_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    copy_repo(root)
    src = root / "src/clipshield"
    (src / "attacks/triggers/toy.py").write_text(TOY_TRIGGER)
    append(src / "attacks/triggers/__init__.py", "from .toy import TOY  # noqa: E402\nregister(TOY)\n")
    (src / "objectives/toy.py").write_text(TOY_METHOD)
    append(src / "objectives/__init__.py", "from .toy import ToyObjective  # noqa: E402\n"
                                          "register(Method('toy_method', ToyObjective, 'clean', marker='*'))\n")
    # Neither has a params section: `clipshield profile` writes an empty one (the defaults), as DVC needs it.
    (root / "toy.yaml").write_text("attack: {triggers: [toy]}\nclean: {methods: [toy_method]}\n"
                                  "harden: {runs: {}, matrix: {methods: [], starts: []}}\n")
    sh("git init -q && dvc init -q && dvc config core.analytics false", root)
    sh("clipshield profile smoke && clipshield profile toy.yaml", root)
    sh("git add -A && git commit -qm toy", root)
    sh("dvc repro report", root)
    return root


def test_the_profile_gives_the_toys_their_sections(toy_project):
    params = yaml.safe_load((toy_project / "params.yaml").read_text())
    assert params["attack"]["triggers"] == ["toy"] and params["attack"]["options"]["toy"] == {}
    assert params["clean"]["methods"] == ["toy_method"] and params["toy_method"] == {}


def test_the_toys_run_through_backdoor_cleaning_and_report(toy_project):
    for model in ("backdoor-toy-s0", "toy_method-toy-s0"):
        assert (toy_project / "models" / model).is_dir(), model
        metrics = json.loads((toy_project / "metrics" / f"{model}.json").read_text())
        assert {"asr", "zeroshot_top1"} <= set(metrics), model
    provenance = json.loads((toy_project / "models/toy_method-toy-s0/provenance.json").read_text())
    assert provenance["attack"]["trigger"] == "toy" and provenance["defence"]["method"] == "toy_method"
    report = (toy_project / "reports/report.md").read_text()
    assert "| backdoor-toy | 1 |" in report and "| toy_method-toy | 1 |" in report
    assert "**toy_method-toy**" in report  # its verdict



# ---- the same, in this process: the registries with a toy entry each ----------------------------------

@pytest.fixture
def toys(monkeypatch):
    from clipshield import objectives
    from clipshield.attacks import triggers
    monkeypatch.setitem(triggers.TRIGGERS, "toy", triggers.Trigger("toy", lambda images, seeds: images, ()))
    monkeypatch.setitem(objectives.METHODS, "toy_method",
                        objectives.Method("toy_method", objectives.ClipObjective, "clean", marker="*"))


def test_the_cli_help_names_what_the_registries_hold(toys):
    from typer.testing import CliRunner

    from clipshield.cli import app
    runner = CliRunner()
    assert "toy" in runner.invoke(app, ["poison", "--help"]).stdout
    assert "finetune | cleanclip | par | toy_method" in runner.invoke(app, ["clean", "--help"]).stdout
    assert "toy" in runner.invoke(app, ["triggers", "--help"]).stdout


def test_triggers_all_in_a_profile_is_every_registered_trigger_but_the_variants(toys):
    from clipshield.attacks.triggers import TRIGGERS
    from clipshield.cli import registry_profile
    params = {"attack": {"triggers": ["blended"], "options": {"blended": {"alpha": 0.2}}}, "clean": {"methods": []}}
    filled = registry_profile({"attack": {"triggers": "all"}}, params)
    variants = {name for name, t in TRIGGERS.items() if t.variant_of}
    assert filled["attack"]["triggers"] == [name for name in TRIGGERS if name not in variants]
    assert "toy" in filled["attack"]["triggers"]
    # a section for every trigger without one (the stages declare it), none for those that have one
    assert "blended" not in filled["attack"]["options"] and filled["attack"]["options"]["toy"] == {}


def test_only_registered_names_get_a_section(toys):
    from clipshield.cli import registry_profile
    params = {"attack": {"triggers": ["blended"], "options": {}}, "clean": {"methods": []}}
    profile = {"attack": {"triggers": ["blendd"]}, "clean": {"methods": ["toy_method", "parr"]}}
    # the misspelt names are left to params validation, which names them with the valid ones
    assert registry_profile(profile, params) == {**profile, "toy_method": {}}


def test_a_filled_in_profile_with_a_problem_names_its_own_file(project):
    from typer.testing import CliRunner

    from clipshield.cli import app
    (project / "profiles/bad.yaml").write_text("attack: {triggers: all}\npoison: {rate: 3}\n")
    before = (project / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["profile", "bad"])
    assert result.exit_code == 1
    assert "profile profiles/bad.yaml would make 1 problem(s)" in " ".join(result.stderr.split())
    assert (project / "params.yaml").read_text() == before
