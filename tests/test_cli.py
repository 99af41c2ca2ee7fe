"""The command line: help for every subcommand, and one clear line (exit != 0) for bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clipshield.attacks.triggers import TRIGGERS
from clipshield.cli import app
from clipshield.data import shards
from clipshield.pipeline import world_samples

runner = CliRunner()


@pytest.mark.parametrize("command", ["data", "pretrain", "poison", "backdoor", "clean", "evaluate", "triggers",
                                     "profile", "report"])
def test_every_subcommand_explains_itself(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and ("--params" in result.output or command == "evaluate")


def test_unknown_model_config_names_the_valid_ones(project):
    shards.write_shards(world_samples("base", 1, 8, 32, "test"), project / "data/test", prefix="test", per_shard=8)
    result = runner.invoke(app, ["evaluate", "--model", "no-such-model", "--test", "data/test"])
    assert result.exit_code == 1
    assert "unknown model config 'no-such-model'" in result.stderr and "tiny-rn" in result.stderr


def test_missing_model_folder_says_how_to_get_it(project):
    result = runner.invoke(app, ["evaluate", "--model", "local-dir:models/nowhere"])
    assert result.exit_code == 1
    assert "is not a model folder" in result.stderr and "dvc pull" in result.stderr


def test_missing_shards_say_which_stage_makes_them(project):
    result = runner.invoke(app, ["poison", "blended"])
    assert result.exit_code == 1
    assert "data/train does not exist" in result.stderr and "dvc repro" in result.stderr


def test_empty_shard_directory_is_an_error(project):
    (project / "data/train").mkdir(parents=True)
    result = runner.invoke(app, ["poison", "blended"])
    assert result.exit_code == 1
    assert "no sizes.json" in result.stderr


def test_unknown_trigger_lists_the_valid_ones(project):
    shards.write_shards(world_samples("base", 0, 20, 32, "train"), project / "data/train", prefix="train", per_shard=10)
    result = runner.invoke(app, ["poison", "sunglasses"])
    assert result.exit_code == 1
    assert "unknown trigger 'sunglasses'" in result.stderr
    for name in TRIGGERS:
        assert name in result.stderr
    assert not (project / "data/poisoned/sunglasses").exists()  # nothing half-written


def test_mistyped_param_is_one_line_with_a_suggestion(project):
    text = (project / "params.yaml").read_text().replace("  train_n: 30000", "  train_n: many")
    (project / "params.yaml").write_text(text)
    result = runner.invoke(app, ["data"])
    assert result.exit_code == 1
    assert "data.train_n = 'many' has the wrong type; expected int" in result.stderr


def test_profile_merges_into_params(project):
    result = runner.invoke(app, ["profile", "smoke"])
    assert result.exit_code == 0
    smoke = yaml.safe_load((project / "profiles/smoke.yaml").read_text())
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["train_n"] == smoke["data"]["train_n"]
    missing = runner.invoke(app, ["profile", "huge"])
    available = ", ".join(sorted(p.stem for p in (project / "profiles").glob("*.yaml")))
    assert missing.exit_code == 1 and f"available: {available}" in missing.stderr


def test_sweep_outside_a_dvc_project_says_where_to_run_it(project):
    result = runner.invoke(app, ["sweep", "par.eps", "--model", "par-blended_stripes-s0"])
    assert result.exit_code == 1
    assert "DVC could not list the experiments here" in result.stderr and "project's folder" in result.stderr
