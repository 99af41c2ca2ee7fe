import pytest
import yaml

from clipshield.work.train import decode_threads, warmup_steps
from clipshield.params import (AttackParams, CleanParams, PretrainParams, ParamsError, TrainParams, apply_profile,
                               deep_merge, load_section, objective_options, parse, read_yaml)

OK = {"steps": 10, "batch_size": 4, "lr": 0.1}


def test_parse_ok_with_defaults():
    p = parse(TrainParams, OK, "clean")
    assert (p.steps, p.batch_size, p.lr, p.warmup, p.schedule, p.weight_decay) == (10, 4, 0.1, 0, "cosine", 0.1)


def test_int_accepted_for_float():
    p = parse(TrainParams, {**OK, "lr": 1, "weight_decay": 0}, "clean")
    assert p.lr == 1.0 and isinstance(p.lr, float)
    assert isinstance(p.weight_decay, float)


def test_missing_key_named():
    with pytest.raises(ParamsError, match=r"`clean\.steps`"):
        parse(TrainParams, {"batch_size": 4, "lr": 0.1}, "clean")


def test_unknown_key_did_you_mean():
    with pytest.raises(ParamsError) as e:
        parse(TrainParams, {**OK, "stpes": 3}, "clean")
    msg = str(e.value)
    assert "clean.stpes" in msg and "did you mean `clean.steps`" in msg


def test_unknown_key_without_near_match_lists_keys():
    with pytest.raises(ParamsError) as e:
        parse(TrainParams, {**OK, "zzzzzz": 3}, "clean")
    assert "clean.zzzzzz" in str(e.value) and "known keys" in str(e.value) and "batch_size" in str(e.value)


@pytest.mark.parametrize("key, value", [("steps", "ten"), ("steps", 2.5), ("steps", True), ("lr", "fast"),
                                        ("lr", True), ("schedule", 3)])
def test_wrong_type_named(key, value):
    with pytest.raises(ParamsError) as e:
        parse(TrainParams, {**OK, key: value}, "clean")
    assert f"clean.{key}" in str(e.value) and repr(value) in str(e.value)


def test_optional_and_list_and_dict_types():
    p = parse(PretrainParams, {**OK, "pretrained": None}, "pretrain")
    assert p.pretrained is None and p.model == "tiny-rn"
    assert parse(PretrainParams, {**OK, "pretrained": "openai"}, "pretrain").pretrained == "openai"
    with pytest.raises(ParamsError, match="pretrain.pretrained"):
        parse(PretrainParams, {**OK, "pretrained": 3}, "pretrain")
    a = parse(AttackParams, {"triggers": ["blended"], "target": "star", "options": {"blended": {"alpha": 0.2}}}, "attack")
    assert a.triggers == ["blended"]
    with pytest.raises(ParamsError, match=r"attack\.triggers\[1\]"):
        parse(AttackParams, {"triggers": ["blended", 3], "target": "star", "options": {}}, "attack")
    with pytest.raises(ParamsError, match="attack.triggers"):
        parse(AttackParams, {"triggers": "blended", "target": "star", "options": {}}, "attack")
    with pytest.raises(ParamsError, match="attack.options"):
        parse(AttackParams, {"triggers": [], "target": "star", "options": [1]}, "attack")


def test_default_factory_not_shared():
    a = parse(CleanParams, OK, "clean")
    b = parse(CleanParams, OK, "clean")
    assert a.methods == ["finetune", "cleanclip", "par"]
    a.methods.append("x")
    assert b.methods == ["finetune", "cleanclip", "par"]


def test_section_not_a_mapping():
    with pytest.raises(ParamsError, match="clean"):
        parse(TrainParams, [1, 2], "clean")


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


def test_load_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"clean": {**OK, "lr": 1}}))
    assert load_section(TrainParams, "clean", path).lr == 1.0
    with pytest.raises(ParamsError, match="`backdoor`"):
        load_section(TrainParams, "backdoor", path)


def test_deep_merge_hand():
    base = {"a": {"x": 1, "y": 2, "n": {"p": 1, "q": 2}}, "b": 3, "c": [1, 2]}
    over = {"a": {"y": 5, "z": 6, "n": {"q": 9}}, "c": [7], "d": {"k": 1}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"x": 1, "y": 5, "z": 6, "n": {"p": 1, "q": 9}}, "b": 3, "c": [7], "d": {"k": 1}}
    assert base == {"a": {"x": 1, "y": 2, "n": {"p": 1, "q": 2}}, "b": 3, "c": [1, 2]}  # inputs untouched


def test_apply_profile_deep_merges_and_writes(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data: {train_n: 100, seed: 0}\npretrain: {steps: 5, lr: 0.1}\npoison: {rate: 0.05}\n")
    profile = tmp_path / "small.yaml"
    profile.write_text("data: {train_n: 10}\npretrain: {model: smoke-rn}\nextra: {k: 1}\n")
    merged = apply_profile(profile, params)
    expected = {"data": {"train_n": 10, "seed": 0}, "pretrain": {"steps": 5, "lr": 0.1, "model": "smoke-rn"},
                "poison": {"rate": 0.05}, "extra": {"k": 1}}
    assert merged == expected
    assert yaml.safe_load(params.read_text()) == expected
    # section order of params.yaml is kept
    assert list(yaml.safe_load(params.read_text())) == ["data", "pretrain", "poison", "extra"]


def test_apply_profile_missing_lists_available(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "smoke.yaml").write_text("a: 1\n")
    (tmp_path / "params.yaml").write_text("a: 0\n")
    with pytest.raises(ParamsError) as e:
        apply_profile(tmp_path / "profiles" / "nope.yaml", tmp_path / "params.yaml")
    assert "smoke" in str(e.value)
    assert (tmp_path / "params.yaml").read_text() == "a: 0\n"


def test_objective_options():
    assert objective_options("par", {"eps": 1.0, "noise_p": 0.5}) == {"eps": 1.0, "noise_p": 0.5}
    with pytest.raises(ParamsError, match=r"did you mean `par\.eps`"):
        objective_options("par", {"epss": 1.0})
    with pytest.raises(ParamsError, match="valid methods"):
        objective_options("nope", {})


def test_objective_options_checks_finetune():
    with pytest.raises(ParamsError, match="finetune.noise_pp"):
        objective_options("finetune", {"noise_pp": 0.5})


def test_repo_params_yaml_parses():
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    data = read_yaml(path)
    parse(PretrainParams, data["pretrain"], "pretrain")
    parse(CleanParams, data["clean"], "clean")
    parse(AttackParams, data["attack"], "attack")


def test_accumulation_must_split_every_batch():
    from pathlib import Path

    from clipshield.params import validate
    root = Path(__file__).parent.parent
    problems = validate(deep_merge(read_yaml(root / "params.yaml"), {"train": {"accum": 3}}))
    assert any("`pretrain.batch_size` = 128 does not split over train.nproc x train.accum = 1 x 3; use a multiple of 3"
               in p for p in problems), problems
    assert any("`train.accum` = 0 is not allowed" in p
               for p in validate(deep_merge(read_yaml(root / "params.yaml"), {"train": {"accum": 0}})))
    assert validate(deep_merge(read_yaml(root / "params.yaml"), {"train": {"accum": 4}})) == []  # 128 and 64 split in 4


@pytest.mark.parametrize("warmup, steps, expected", [(0, 300, 0), (0.07, 300, 21), (0.07, 20000, 1400),
                                                     (0.07, 3, 0), (100, 1500, 100), (7.0, 300, 7)])
def test_warmup_is_a_fraction_of_the_steps_below_one_else_a_step_count(warmup, steps, expected):
    from clipshield.pipeline import train_config
    p = parse(TrainParams, {**OK, "steps": steps, "warmup": warmup}, "harden")
    assert warmup_steps(p) == expected == train_config(p).warmup


@pytest.mark.parametrize("warmup, match", [(-0.1, "use a fraction of the steps"), (1.5, "use a fraction of the steps"),
                                           ("7%", "wrong type")])
def test_bad_warmups_are_refused_with_the_key_named(warmup, match):
    from pathlib import Path

    from clipshield.params import validate
    root = Path(__file__).parent.parent
    problems = validate(deep_merge(read_yaml(root / "params.yaml"), {"harden": {"warmup": warmup}}))
    assert any("harden.warmup" in p and match in p for p in problems), problems


def test_every_profile_warms_fare_up_over_seven_percent_of_its_steps():
    from pathlib import Path
    root = Path(__file__).parent.parent
    for profile in [None, *sorted((root / "profiles").glob("*.yaml"))]:
        raw = read_yaml(root / "params.yaml")
        if profile is not None:
            raw = deep_merge(raw, read_yaml(profile))
        p = parse(TrainParams, {k: v for k, v in raw["harden"].items() if k not in ("data", "runs", "matrix")}, "harden")
        assert p.warmup == 0.07, profile
        assert warmup_steps(p) == round(0.07 * p.steps)


def test_the_paper_profile_names_every_trigger_option_at_224_px(tmp_path):
    """`clipshield profile paper` (apply_profile) gives the papers' trigger strengths, none of the tiny 32-px ones."""
    import shutil
    from pathlib import Path

    from clipshield.attacks.triggers import TRIGGERS, scaled
    root = Path(__file__).parent.parent
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    merged = apply_profile(root / "profiles" / "paper.yaml", tmp_path / "params.yaml")
    assert merged == read_yaml(tmp_path / "params.yaml")
    assert merged["data"]["image_size"] == 224
    options = load_section(AttackParams, "attack", tmp_path / "params.yaml").options
    assert options == read_yaml(root / "profiles" / "paper.yaml")["attack"]["options"]  # no 32-px value left over
    assert set(options) == set(TRIGGERS)
    for name, trigger in TRIGGERS.items():  # every option of every trigger is named
        assert set(options[name]) == set(trigger.options), name
    # the 224-px sizes are what the triggers' own scaled() defaults give at 224 px
    assert options["badnet"]["patch"] == options["badnet_stripes"]["patch"] == scaled(16, 224)
    assert options["blended_triangles"]["tile"] == scaled(14, 224)


def test_synthetic_pairs_at_another_size_than_the_model_are_refused_by_the_profile(tmp_path):
    """The paper profile saved its diffusion pairs at 256 px for a 224-px model: PAR and FARE train on them, and
    training refused them only when the cleaning stage started. The profile now saves them at 224, and a mismatch is
    a params problem, named before anything runs."""
    import shutil
    from pathlib import Path

    from clipshield.params import validate
    root = Path(__file__).parent.parent
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    merged = apply_profile(root / "profiles" / "paper.yaml", tmp_path / "params.yaml")
    assert merged["synth"]["image_size"] == merged["data"]["image_size"] == 224
    assert not [p for p in validate(merged) if "synth" in p]
    merged["synth"]["image_size"] = 256
    problems = [p for p in validate(merged) if "synth.image_size" in p]
    assert problems and "clean.data and harden.data train the 224-px model" in problems[0]
    assert "set synth.image_size: 224" in problems[0]
    merged["clean"]["data"] = merged["harden"]["data"] = "data/train"  # not trained on: any saved size will do
    assert not [p for p in validate(merged) if "synth.image_size" in p]


def test_loader_threads_auto_is_none_on_cpu_and_a_share_of_the_cores_on_gpu(monkeypatch):
    from pathlib import Path

    from clipshield.params import LaunchParams, deep_merge, read_yaml, validate
    root = Path(__file__).resolve().parents[1]
    base = read_yaml(root / "params.yaml")
    assert validate(deep_merge(base, {"train": {"loader_threads": 4}})) == []
    for bad in (-1, "many", 2.5):
        assert any("train.loader_threads" in p for p in validate(deep_merge(base, {"train": {"loader_threads": bad}})))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert decode_threads(LaunchParams(), on_gpu=False) == 0
    assert decode_threads(LaunchParams(), on_gpu=True) == 8
    assert decode_threads(LaunchParams(nproc=4), on_gpu=True) == 4
    assert decode_threads(LaunchParams(loader_threads=2), on_gpu=False) == 2


def test_a_misspelt_section_is_refused_naming_the_one_meant():
    """An unknown top-level section used to be read past: `pars: {eps: 1}` left par's eps at its default."""
    from pathlib import Path

    from clipshield.params import validate
    raw = read_yaml(Path(__file__).parent.parent / "params.yaml")
    assert validate({**raw, "pars": {"eps": 1}}) == ["unknown section `pars` in params.yaml; did you mean `par`?"]
    (problem,) = validate({**raw, "zzzzzz": {"k": 1}})
    assert problem.startswith("unknown section `zzzzzz` in params.yaml; known sections: seeds, train, data, eval")


def test_more_test_images_than_the_world_makes_are_refused_with_both_numbers():
    """eval.test_n above data.test_n used to evaluate data.test_n images and say nothing."""
    from pathlib import Path

    from clipshield.params import validate
    raw = read_yaml(Path(__file__).parent.parent / "params.yaml")
    assert validate(deep_merge(raw, {"eval": {"test_n": 5000}})) == [
        "`eval.test_n` = 5000 is not allowed; the test set holds data.test_n = 2000 samples: set eval.test_n: 2000 "
        "(or fewer), or raise data.test_n to 5000"]
    shards = {"source": "shards", "train_shards": "cc3m", "test_shards": "val"}
    assert validate(deep_merge(raw, {"eval": {"test_n": 5000}, "data": {**shards, "test_n": 0}})) == []  # size unknown
    assert "at most data.test_n = 1000" in validate(deep_merge(raw, {"eval": {"test_n": 5000},
                                                                     "data": {**shards, "test_n": 1000}}))[0]


def test_one_value_is_one_problem_whatever_the_types_it_may_take():
    """A union (int or float, a number or `auto`) fails in each of its members: the user reads one line."""
    from pathlib import Path

    from clipshield.params import validate
    raw = read_yaml(Path(__file__).parent.parent / "params.yaml")
    assert validate(deep_merge(raw, {"train": {"loader_threads": "many"}, "harden": {"warmup": "7%"},
                                     "par": {"eps": "big"}})) == [
        "`train.loader_threads` = 'many' is not allowed; use auto or a whole number >= 0 (0: decode in the training "
        "thread)",
        "harden.warmup = '7%' has the wrong type; expected int | float",
        "`par.eps` = 'big' must be a number"]


def test_sections_built_in_code_are_checked_and_keep_their_defaults():
    import dataclasses

    from clipshield.params import LaunchParams, PoisonParams
    p = parse(TrainParams, OK, "clean")
    assert dataclasses.replace(p, seed=3).seed == 3 and vars(p) == vars(TrainParams(**OK))
    assert PoisonParams(0.2, 1).rate == 0.2 and LaunchParams().loader_threads == "auto"
    with pytest.raises(ValueError, match="less than or equal to 1"):
        PoisonParams(2.0, 1)


def test_an_imported_test_set_smaller_than_eval_test_n_is_refused_where_it_is_loaded(tmp_path):
    """Imported shards (data.source: shards, data.test_n: 0) have a size no params check can know: the evaluation
    says so instead of scoring fewer samples than eval.test_n asks."""
    from clipshield.data import shards
    from clipshield.data.classes import classes_file, world_classes
    from clipshield.params import EvalParams
    from clipshield.pipeline import load_test, world_samples
    shards.write_shards(world_samples("base", 1, 8, 32, "test"), tmp_path, prefix="test", per_shard=8,
                        extra_files=classes_file(world_classes()))
    assert len(load_test(EvalParams(test_n=8, retrieval_n=8), tmp_path)) == 8
    with pytest.raises(shards.DataError, match=rf"eval.test_n = 20 but the test set {tmp_path} holds 8 samples; set "
                                               r"eval.test_n: 8 \(or fewer\), or import a larger test set"):
        load_test(EvalParams(test_n=20, retrieval_n=8), tmp_path)


def test_a_hardening_run_from_a_model_no_stage_makes_is_refused_listing_those_it_can_start_from(tmp_path, monkeypatch):
    """A misspelt start used to pass the params check and fail in DVC, stages later, with 'missing dependency'."""
    from pathlib import Path

    from clipshield.params import validate
    raw = read_yaml(Path(__file__).parent.parent / "params.yaml")
    monkeypatch.chdir(tmp_path)
    run = lambda start: {"harden": {"runs": {"fare-x": {"method": "fare", "start": start}}}}  # noqa: E731
    (problem,) = validate(deep_merge(raw, run("parr-blended_stripes-s0")))
    assert problem.startswith("`harden.runs.fare-x.start` = 'parr-blended_stripes-s0' names no model: no stage makes "
                              "models/parr-blended_stripes-s0 and there is no such folder; start from one of "
                              "backdoor-blended_stripes-s0, clean, cleanclip-blended_stripes-s0, ")
    assert "fare-x," not in problem  # not from itself
    assert validate(deep_merge(raw, run("fare-clean"))) == []  # another hardening run's model
    assert validate(deep_merge(raw, {**run("filtered-blended_stripes-s0"),
                                     "detect": {"filter_triggers": ["blended_stripes"]}})) == []
    (tmp_path / "models" / "my-model").mkdir(parents=True)  # a model folder the user put there
    assert validate(deep_merge(raw, run("my-model"))) == []
