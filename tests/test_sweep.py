"""A sweep's table from rows shaped as `dvc.api.exp_show()` gives them (read off a real queue of par.eps
experiments: `metrics/<model>.json:<key>` columns, '!' for a running experiment's missing values, None for a
queued one's)."""
import json

import pytest

from clipshield.sweep import markdown, sweep_rows, write_sweep

PAR = "par-blended_stripes-s0"


def exp(name, rev, eps, asr, top1=0.95, state=None, model=PAR):
    m = f"metrics/{model}.json"
    return {"Experiment": name, "rev": rev, "Created": None, "State": state, "par.eps": eps,
            f"{m}:asr": asr, f"{m}:zeroshot_top1": top1, f"{m}:i2t_r5": 0.4, f"{m}:t2i_r5": 0.87,
            f"{m}:n_test": 2000.0}


ROWS = [
    exp(None, "workspace", 1.8, 0.2),         # the workspace after `dvc exp run -S par.eps=1.8`: its results
    exp(None, "main", 2.15, 0.1375, 0.9505),  # the commit the experiments branch from
    exp("par-eps-2.5", "58199fb", 2.5, 0.05, 0.91),
    exp("par-eps-1.8", "b300074", 1.8, 0.2),
    exp("par-eps-1.5", "405025e", 1.5, "!", "!", state="Running"),
    exp("par-eps-3", "77aa001", 3.0, None, None, state="Queued"),
    exp("par-eps-1.2", "a1b2c3d", 1.2, 0.3, state="Failed"),
]


def test_one_row_per_finished_result_sorted_by_the_value():
    rows = sweep_rows(ROWS, "par.eps", [PAR])
    assert [(r["experiment"], r["par.eps"]) for r in rows] == [("par-eps-1.8", 1.8), ("main", 2.15), ("par-eps-2.5", 2.5)]
    assert rows[1][f"{PAR}.asr"] == 0.1375 and rows[1][f"{PAR}.zeroshot_top1"] == 0.9505
    assert rows[2][f"{PAR}.i2t_r5"] == 0.4 and rows[2][f"{PAR}.t2i_r5"] == 0.87


def test_an_experiment_without_a_models_metrics_is_left_out():
    other = exp("other-model", "c0ffee1", 2.0, 0.5, model="finetune-blended_stripes-s0")
    assert [r["experiment"] for r in sweep_rows(ROWS + [other], "par.eps", [PAR])] == ["par-eps-1.8", "main", "par-eps-2.5"]
    assert sweep_rows(ROWS, "par.eps", ["no-such-model"]) == []


def test_markdown_has_a_column_per_model_and_key():
    text = markdown(sweep_rows(ROWS, "par.eps", [PAR]), "par.eps", [PAR])
    lines = text.splitlines()
    assert lines[0] == (f"| experiment | par.eps | {PAR} zeroshot_top1 | {PAR} asr | {PAR} i2t_r5 | {PAR} t2i_r5 |")
    assert lines[3] == "| main | 2.15 | 0.951 | 0.138 | 0.400 | 0.870 |"


def test_write_sweep_writes_table_json_and_plot(tmp_path):
    rows, table = write_sweep(ROWS, "par.eps", [PAR], tmp_path / "sweeps")
    assert table == tmp_path / "sweeps" / "par.eps.md"
    assert json.loads(table.with_suffix(".json").read_text()) == rows
    assert table.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_of_one_value_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match=r"needs experiments at two values or more .* found: main \(par.eps=2.15\)\. "
                                         r"Run e\.g\. `dvc exp run --queue -S par.eps=\.\.\.`"):
        write_sweep(ROWS[1:2], "par.eps", [PAR], tmp_path)
    assert not (tmp_path / "par.eps.md").exists()


def test_chosen_keys_of_several_models_as_a_poison_rate_sweep_collects_them(tmp_path):
    def rate_exp(name, rate, asrs):
        row = {"Experiment": name, "rev": name, "State": "Success", "poison.rate": rate}
        for model, asr in asrs.items():  # only asr and top-1 recorded: retrieval keys are not asked for
            row |= {f"metrics/{model}.json:asr": asr, f"metrics/{model}.json:zeroshot_top1": 0.97}
        return row
    a, b = "backdoor-badnet-s0", "backdoor-wanet-s0"
    experiments = [rate_exp("r2", 0.02, {a: 1.0, b: 0.99}), rate_exp("r025", 0.0025, {a: 0.5, b: 0.1})]
    keys = ("asr", "zeroshot_top1")
    rows, table = write_sweep(experiments, "poison.rate", [a, b], tmp_path, keys)
    assert [(r["poison.rate"], r[f"{a}.asr"], r[f"{b}.asr"]) for r in rows] == [(0.0025, 0.5, 0.1), (0.02, 1.0, 0.99)]
    assert table.read_text().splitlines()[0] == (f"| experiment | poison.rate | {a} asr | {a} zeroshot_top1 | "
                                                 f"{b} asr | {b} zeroshot_top1 |")
    assert sweep_rows(experiments, "poison.rate", [a, b]) == []  # the default keys include retrieval, not recorded here


def test_a_pattern_names_every_model_it_matches_in_the_experiments(tmp_path):
    from clipshield.sweep import expand_models
    rows = [exp("a", "1", 1.8, 0.2, model="backdoor-wanet-s0"), exp("b", "2", 2.5, 0.1, model="backdoor-badnet-s0"),
            exp("c", "3", 2.5, 0.1)]
    assert expand_models(rows, ["backdoor-*-s0"]) == ["backdoor-badnet-s0", "backdoor-wanet-s0"]
    assert expand_models(rows, [PAR, "backdoor-w*"]) == [PAR, "backdoor-wanet-s0"]
    assert expand_models(rows, ["finetune-*"]) == []
    with pytest.raises(ValueError, match=r"no experiment has metrics of a model named finetune-\*"):
        write_sweep(rows, "par.eps", ["finetune-*"], tmp_path)


def test_three_models_or_more_get_a_table_per_key_with_a_row_per_model():
    models = ["backdoor-a-s0", "backdoor-b-s0", "backdoor-c-s0"]
    rows = [{"experiment": "r1", "poison.rate": 0.005, **{f"{m}.asr": 0.5 + i / 10 for i, m in enumerate(models)},
             **{f"{m}.zeroshot_top1": 0.99 for m in models}},
            {"experiment": "r2", "poison.rate": 0.01, **{f"{m}.asr": 0.9 for m in models},
             **{f"{m}.zeroshot_top1": 0.98 for m in models}}]
    lines = markdown(rows, "poison.rate", models, ("asr", "zeroshot_top1")).splitlines()
    assert lines[:6] == ["asr:", "", "| model | poison.rate=0.005 (r1) | poison.rate=0.01 (r2) |", "|---|---|---|",
                         "| backdoor-a-s0 | 0.500 | 0.900 |", "| backdoor-b-s0 | 0.600 | 0.900 |"]
    assert lines[8:11] == ["zeroshot_top1:", "", "| model | poison.rate=0.005 (r1) | poison.rate=0.01 (r2) |"]
    assert lines[-1] == "| backdoor-c-s0 | 0.990 | 0.980 |"


def test_an_experiment_that_changes_another_parameter_too_is_left_out():
    """`dvc exp run -S attack.target=heart` beside a par.eps sweep: its PAR model is another backdoor's, so its
    par.eps (the commit's) must not become a point of the sweep."""
    rows = [{**e, "attack.target": "square"} for e in ROWS]
    other = {**exp("target-heart", "1234567", 2.15, 0.19), "attack.target": "heart"}
    names = [r["experiment"] for r in sweep_rows(rows + [other], "par.eps", [PAR], others=("attack.target", "par.eps"))]
    assert names == ["par-eps-1.8", "main", "par-eps-2.5"]
    assert "target-heart" in [r["experiment"] for r in sweep_rows(rows + [other], "par.eps", [PAR])]


def test_experiments_that_share_their_other_changes_are_one_sweep():
    """The poison-rate sweep sets `-S backdoor.min_asr=0` in every experiment: they differ from their commit in
    that too, but not from one another."""
    rows = [{**e, "backdoor.min_asr": 0.9 if e["Experiment"] is None else 0} for e in ROWS]
    names = [r["experiment"] for r in sweep_rows(rows, "par.eps", [PAR], others=("backdoor.min_asr",))]
    assert names == ["par-eps-1.8", "par-eps-2.5"]


def test_param_names_are_exp_shows_column_names():
    from clipshield.sweep import param_names
    assert param_names({"par": {"eps": 2.15}, "seeds": [0], "attack": {"options": {"wanet": {"grid": 4}}}, "e": {}}) \
        == ["par.eps", "seeds", "attack.options.wanet.grid", "e"]
