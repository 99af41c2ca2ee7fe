"""The model registry is generated from params.yaml and stays in sync with it; the paper profile's model builds."""
from pathlib import Path

import pytest
import torch
import yaml

from clipshield.params import deep_merge, read_yaml
from clipshield.registry import artifacts_block, final_models, sync_artifacts

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_declares_the_models_params_yaml_makes():
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    assert declared == final_models(read_yaml(ROOT / "params.yaml"), "models")


def test_names_labels_and_harden_lineage_by_hand():
    params = read_yaml(ROOT / "params.yaml")
    params["attack"]["triggers"] = ["badnet"]
    params["clean"]["methods"] = ["par"]
    params["seeds"] = [0, 1]
    params["harden"]["runs"] = {"fare2-par-badnet-s1": {"method": "fare", "start": "par-badnet-s1", "eps": 2}}
    params["harden"]["matrix"] = {"methods": ["fare"], "starts": ["backdoor"]}
    models = final_models(params, "models")
    assert list(models) == ["clean", "backdoor-badnet-s0", "par-badnet-s0", "backdoor-badnet-s1", "par-badnet-s1",
                            "fare2-par-badnet-s1", "fare-backdoor-badnet-s0", "fare-backdoor-badnet-s1"]
    assert models["fare-backdoor-badnet-s1"]["labels"] == ["attack:backdoor", "trigger:badnet", "seed:1", "defence:fare"]
    assert models["par-badnet-s1"]["labels"] == ["attack:backdoor", "trigger:badnet", "defence:par", "seed:1"]
    assert models["fare2-par-badnet-s1"]["labels"] == ["attack:backdoor", "trigger:badnet", "seed:1", "defence:par+fare"]
    assert "eps 2/255" in models["fare2-par-badnet-s1"]["desc"]


def test_a_filtered_retraining_is_a_model_of_the_registry_only_for_the_triggers_filtered():
    params = read_yaml(ROOT / "params.yaml")
    params["attack"]["triggers"] = ["badnet", "wanet"]
    params["detect"]["filter_triggers"] = ["wanet"]
    models = final_models(params, "models")
    assert "filtered-wanet-s0" in models and "filtered-badnet-s0" not in models
    assert models["filtered-wanet-s0"]["labels"] == ["attack:backdoor", "trigger:wanet", "defence:filter", "seed:0"]
    assert models["filtered-wanet-s0"]["path"] == "models/filtered-wanet-s0"


def test_sync_rewrites_only_the_generated_block(tmp_path):
    params = read_yaml(ROOT / "params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text((ROOT / "dvc.yaml").read_text())
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    params["attack"]["triggers"] = ["wanet"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert sync_artifacts(dvc_yaml, tmp_path / "params.yaml", "models") == len(final_models(params, "models"))
    after = yaml.safe_load(dvc_yaml.read_text())
    assert after["stages"] == stages and "backdoor-wanet-s0" in after["artifacts"]
    assert dvc_yaml.read_text().count("artifacts:") == 1
    assert artifacts_block(read_yaml(tmp_path / "params.yaml"), "models") in dvc_yaml.read_text()


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_has_a_registry(profile):
    from clipshield.cli import registry_profile  # what `clipshield profile` merges: `triggers: all` listed
    base = read_yaml(ROOT / "params.yaml")
    params = deep_merge(base, registry_profile(read_yaml(ROOT / "profiles" / f"{profile}.yaml"), base))
    models = final_models(params, "models")
    assert "clean" in models and all(m["path"] == f"models/{name}" for name, m in models.items())
    for t in params["attack"]["triggers"]:
        assert all(f"backdoor-{t}-s{s}" in models for s in params["seeds"]), t


def test_paper_profile_model_builds_offline_and_takes_one_training_step():
    from clipshield.models import create
    from clipshield.objectives import build_objective
    from clipshield.training import TrainConfig, train
    paper = read_yaml(ROOT / "profiles" / "paper.yaml")
    clip = create(paper["pretrain"]["model"], pretrained=None, seed=0)  # the config, random weights, no download
    assert clip.image_size == 224 and sum(p.numel() for p in clip.model.parameters()) > 100e6
    batch = {"images": torch.rand(2, 3, 224, 224), "captions": ["a photo of a star.", "a photo of a ring."],
             "labels": torch.tensor([3, 4])}
    before = clip.model.visual.conv1.weight.detach().clone()
    result = train(clip, build_objective("clip"), iter([batch]), TrainConfig(steps=1, lr=1e-4, log_every=1))
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
    assert not torch.equal(before, clip.model.visual.conv1.weight)
