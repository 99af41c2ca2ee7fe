"""Backdoor-sample detection scores and their metrics, on point sets whose answers can be worked out by hand."""
import math

import pytest
import torch

from clipshield.detection import (auroc, dao, drop_top, k_distance, lid_mle, neighbours, precision_at_rate,
                                  score_all, score_in_batches, slof)


def line(*xs):
    return torch.tensor([[float(x), 0.0] for x in xs])


def test_k_distance_on_a_line():
    # points 0, 1, 3, 7: nearest others of 0 are 1 (1), 3 (3); of 3: 1 (2), 0 (3); of 7: 3 (4), 1 (6)
    nb = neighbours(line(0, 1, 3, 7), k=2)
    assert k_distance(nb).tolist() == [3.0, 2.0, 3.0, 6.0]
    assert nb.idx[3].tolist() == [2, 1]


def test_neighbours_in_chunks_equal_one_pass():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    whole, chunked = neighbours(x, 4), neighbours(x, 4, chunk_elements=60)  # 1 row per chunk
    assert torch.equal(whole.idx, chunked.idx) and torch.allclose(whole.dist, chunked.dist)


def test_a_duplicate_is_a_neighbour_at_distance_zero():
    nb = neighbours(line(0, 0, 5), k=1)
    assert nb.dist[:, 0].tolist() == [0.0, 0.0, 5.0]
    assert nb.idx[:2, 0].tolist() == [1, 0]


def test_k_needs_more_points():
    with pytest.raises(ValueError, match="k = 3"):
        neighbours(line(0, 1, 2), k=3)


def test_lid_of_points_evenly_spaced_on_a_line():
    # neighbours at 1, 2, 3, 4 (k = 4): -4 / (log 1/4 + log 2/4 + log 3/4 + 0) = 4 / log(32/3)
    nb = neighbours(line(0, 1, 2, 3, 4), k=4)
    assert lid_mle(nb)[0].item() == pytest.approx(4 / torch.log(torch.tensor(32 / 3)).item(), rel=1e-5)


def cluster_and_far_points():
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(60, 4, generator=g) * 0.1
    far = torch.tensor([[5.0, 0, 0, 0], [0, -6.0, 0, 0], [0, 0, 7.0, 0]])
    return torch.cat([cluster, far]), torch.cat([torch.zeros(60), torch.ones(3)]).bool()


@pytest.mark.parametrize("score", [k_distance, slof, dao])
def test_far_points_rank_first(score):
    x, far = cluster_and_far_points()
    s = score(neighbours(x, k=5))
    assert set(torch.argsort(s, descending=True)[:3].tolist()) == {60, 61, 62}
    assert auroc(s, far) == 1.0


def test_slof_is_one_on_a_regular_grid():
    # every point of an evenly spaced ring has the same k-distance: each ratio is 1
    t = torch.arange(12) * (2 * torch.pi / 12)
    ring = torch.stack([t.cos(), t.sin()], dim=1)
    nb = neighbours(ring, k=2)
    assert torch.allclose(slof(nb), torch.ones(12), atol=1e-5)


def test_dao_weights_the_log_ratios_by_the_neighbours_lid():
    # points 0, 1, 3, 7 with k = 2 (k-distances 3, 2, 3, 6: test_k_distance_on_a_line). Point 7's neighbours are
    # 3 (neighbours at 2, 3: LID -2 / log(2/3)) and 1 (at 1, 2: LID -2 / log(1/2)), so
    # DAO(7) = (LID(3) log(6/3) + LID(1) log(6/2)) / 2
    nb = neighbours(line(0, 1, 3, 7), k=2)
    lid3, lid1 = 2 / math.log(1.5), 2 / math.log(2)
    assert lid_mle(nb)[[2, 1]].tolist() == pytest.approx([lid3, lid1], rel=1e-5)
    expected = (lid3 * math.log(2) + lid1 * math.log(3)) / 2
    assert dao(nb)[3].item() == pytest.approx(expected, rel=1e-5)


def test_scores_in_batches_cover_every_row_and_find_the_far_points():
    x, far = cluster_and_far_points()
    s = score_in_batches(x, k=5, batch_size=30, seed=1)
    assert set(s) == {"k_distance", "slof", "dao"} and all(v.shape == (63,) for v in s.values())
    assert auroc(s["k_distance"], far) == 1.0
    # a batch as large as the set is the whole set
    assert torch.equal(score_in_batches(x, 5, batch_size=63)["slof"], score_all(x, 5)["slof"])


def test_auroc_perfect_reversed_tied():
    poison = torch.tensor([0, 0, 1, 1]).bool()
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), poison) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), poison) == 0.0
    assert auroc(torch.ones(4), poison) == 0.5
    # one tie between a poisoned and a clean pair: 3 of 4 pairs ordered + half of one = 3.5 / 4
    assert auroc(torch.tensor([0.1, 0.5, 0.5, 0.9]), poison) == 0.875


def test_auroc_and_precision_without_poison_are_none():
    assert auroc(torch.rand(5), torch.zeros(5).bool()) is None
    assert auroc(torch.rand(5), torch.ones(5).bool()) is None
    assert precision_at_rate(torch.rand(5), torch.zeros(5).bool()) is None


def test_precision_at_the_poison_rate():
    poison = torch.tensor([1, 0, 1, 0, 0]).bool()
    # the two highest scores are rows 1 and 2: one of them poisoned
    assert precision_at_rate(torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3]), poison) == 0.5
    assert precision_at_rate(torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3]), poison) == 1.0


def test_drop_top_keeps_the_rest():
    keep = drop_top(torch.tensor([0.5, 0.9, 0.1, 0.7]), 0.5)
    assert keep.tolist() == [True, False, True, False]
    assert drop_top(torch.rand(4), 0.0).all()


@pytest.fixture
def poisoned_sets(tmp_path):
    """60 world pairs poisoned at 20% and at 0% (blended_stripes), a random smoke-rn model saved as a folder."""
    from clipshield import models
    from clipshield.data import shards
    from clipshield.params import AttackParams, PoisonParams
    from clipshield.work.data import world_samples
    from clipshield.work.poison import poison
    from clipshield.data.classes import classes_file, world_classes
    shards.write_shards(world_samples("base", 0, 60, 32, "train"), tmp_path / "train", prefix="train", per_shard=30,
                        extra_files=classes_file(world_classes()))
    attack = AttackParams(triggers=["blended_stripes"], target="square", options={"blended_stripes": {"alpha": 0.5}})
    poison("blended_stripes", attack, PoisonParams(rate=0.2, seed=1), tmp_path / "train", tmp_path / "poisoned")
    model = models.save(models.create("smoke-rn", seed=0), tmp_path / "model", {"name": "model"})
    return tmp_path, model


def test_the_stage_scores_every_pair_against_the_manifest(poisoned_sets):
    import json
    from clipshield.sections import DetectParams
    from clipshield.work.detect import detect
    root, model = poisoned_sets
    metrics = detect("blended_stripes", DetectParams(k=4, batch_size=0), root / "poisoned", model, model,
                     root / "metrics.json", root / "out")
    written = json.loads((root / "metrics.json").read_text())
    assert set(written) == {"backdoored", "clean"} and set(written["clean"]) == {"k_distance", "slof", "dao"}
    assert written["backdoored"]["dao"]["n"] == 60 and written["backdoored"]["dao"]["n_poison"] == 12
    assert 0 <= written["backdoored"]["slof"]["auroc"] <= 1
    assert metrics["clean"] == metrics["backdoored"]  # the same model twice: the same scores
    rows = [json.loads(line) for line in (root / "out" / "scores.jsonl").read_text().splitlines()]
    poisoned = {json.loads(line)["key"] for line in (root / "poisoned" / "manifest.jsonl").read_text().splitlines()}
    assert len(rows) == 60 and {r["key"] for r in rows if r["poisoned"]} == poisoned
    assert (root / "out" / "scores.png").stat().st_size > 0


def test_a_set_without_poison_has_no_auroc_and_says_so():
    from clipshield.detection import detection_metrics
    from clipshield.work.detect import verdict
    m = detection_metrics({"dao": torch.rand(10)}, torch.zeros(10).bool())
    assert m["dao"]["auroc"] is None and m["dao"]["precision_at_rate"] is None
    assert verdict(m) == "no AUROC: 0 of the 10 pairs are poisoned, and a ranking needs both poisoned and clean pairs"
    assert verdict(detection_metrics({"dao": torch.tensor([0.0, 1.0])}, torch.tensor([False, True]))) == "DAO AUROC 1.000"


def test_the_report_puts_each_triggers_aurocs_beside_random(tmp_path):
    import json
    from clipshield.report import detection_table
    m = {"n": 100, "n_poison": 1}
    (tmp_path / "detect-badnet.json").write_text(json.dumps({
        "backdoored": {"k_distance": {**m, "auroc": 0.9}, "slof": {**m, "auroc": 0.75}, "dao": {**m, "auroc": 0.8125}},
        "clean": {"k_distance": {**m, "auroc": 0.5}, "slof": {**m, "auroc": None}, "dao": {**m, "auroc": 0.25}}}))
    table = detection_table(tmp_path, ["badnet", "wanet"]).splitlines()
    assert table[2] == "| badnet | backdoored model | 0.900 | 0.750 | 0.812 | 0.5 | 1 / 100 |"
    assert table[3] == "| badnet | clean model | 0.500 | – | 0.250 | 0.5 | 1 / 100 |"
    assert len(table) == 4  # wanet was not scored: no row
    assert detection_table(tmp_path, ["wanet"]) == ""


def test_the_filter_drops_the_highest_scores_and_counts_the_poisoned_left(poisoned_sets):
    import json
    from clipshield.data import shards
    from clipshield.sections import DetectParams
    from clipshield.work.detect import detect
    from clipshield.work.filtered import filter_set
    root, model = poisoned_sets
    p = DetectParams(k=4, score="slof", filter_fraction=0.25)
    detect("blended_stripes", p, root / "poisoned", model, model, root / "detect.json", root / "scores")
    rows = [json.loads(line) for line in (root / "scores" / "scores.jsonl").read_text().splitlines()]
    top = {r["key"] for r in sorted(rows, key=lambda r: -r["slof"])[:15]}  # round(0.25 x 60)
    counts = filter_set("blended_stripes", p, root / "poisoned", root / "scores", root / "filtered", root / "f.json")
    kept = [s["key"] for s in shards.iter_samples(root / "filtered", decode=False)]
    assert len(kept) == 45 and not top & set(kept)
    poisoned = {r["key"] for r in rows if r["poisoned"]}
    left = [json.loads(line)["key"] for line in (root / "filtered" / "manifest.jsonl").read_text().splitlines()]
    assert set(left) == poisoned - top and counts["poisoned_left"] == len(left)
    assert counts["poisoned_dropped"] == len(poisoned & top) and counts["dropped"] == 15


def test_a_poisoned_cluster_larger_than_k_hides_in_the_whole_set_but_not_in_small_batches():
    # 30 near-identical points far from 970 clean ones: among all 999 others each has 29 twins closer than any
    # clean point, so with k = 16 it looks dense; in random batches of 100 it has about 3, and its 16th neighbour
    # is a clean point far away
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(970, 8, generator=g)
    cluster = torch.tensor([6.0] + [0.0] * 7) + 0.05 * torch.randn(30, 8, generator=g)
    x, poison = torch.cat([clean, cluster]), torch.cat([torch.zeros(970), torch.ones(30)]).bool()
    whole, batched = score_in_batches(x, 16, batch_size=0), score_in_batches(x, 16, batch_size=100, seed=0)
    assert auroc(whole["k_distance"], poison) == 0.0
    assert auroc(batched["k_distance"], poison) == 1.0
    assert auroc(batched["slof"], poison) > 0.95 and auroc(batched["dao"], poison) > 0.95


def test_the_report_says_how_many_poisoned_pairs_the_filter_left(tmp_path):
    import json
    from clipshield.report import filter_lines
    (tmp_path / "filter-badnet.json").write_text(json.dumps(
        {"pairs": 1000, "dropped": 20, "poisoned": 10, "poisoned_dropped": 7, "poisoned_left": 3, "score": "dao",
         "filter_fraction": 0.02}))
    assert filter_lines(tmp_path, ["badnet", "wanet"]) == [
        "- badnet: the 20 of 1000 pairs with the highest dao dropped (detect.filter_fraction 0.02): 7 of the 10 "
        "poisoned pairs among them, 3 left for the re-training (`filtered-badnet`)", ""]
    assert filter_lines(tmp_path, ["wanet"]) == []


def test_only_an_attack_trigger_can_be_filtered():
    from clipshield.params import validate
    from clipshield.paramsfile import read_yaml
    params = read_yaml("params.yaml")
    params["attack"]["triggers"] = ["blended_stripes"]
    params["detect"]["filter_triggers"] = ["blended_stripes"]
    assert validate(params) == []
    params["detect"]["filter_triggers"] = ["badnet"]
    assert validate(params) == ["`detect.filter_triggers` = ['badnet'] is not allowed; only a trigger of "
                                "attack.triggers has a poisoned set to filter: use some of ['blended_stripes'] (or [])"]


def _detection_run(root):
    """A run's metrics and times: badnet scored and filtered (seed 0), wanet scored only."""
    import json
    m = {"n": 1000, "n_poison": 10}
    metrics, times = root / "metrics", root / "times"
    metrics.mkdir()
    times.mkdir()
    for t, auroc in (("badnet", 0.9), ("wanet", 0.25)):
        (metrics / f"detect-{t}.json").write_text(json.dumps({model: {s: {**m, "auroc": auroc if model == "backdoored"
                                                                          else 0.5} for s in ("k_distance", "dao")}
                                                              for model in ("backdoored", "clean")}))
        (metrics / f"backdoor-{t}-s0.json").write_text(json.dumps({"asr": 0.99, "zeroshot_top1": 0.98, "i2t_r5": 0.9}))
        (times / f"detect@{t}.json").write_text(json.dumps({"stage": f"detect@{t}", "seconds": 50.0, "cpu": "AMD EPYC",
                                                            "cores": 2, "avx512": False}))
    (metrics / "filter-badnet.json").write_text(json.dumps(
        {"pairs": 1000, "dropped": 20, "poisoned": 10, "poisoned_dropped": 7, "poisoned_left": 3, "score": "dao",
         "filter_fraction": 0.02}))
    (metrics / "filtered-badnet-s0.json").write_text(json.dumps({"asr": 0.125, "zeroshot_top1": 0.96}))
    (metrics / "par-badnet-s0.json").write_text("{}")  # not a detection result: not copied
    (root / "params.yaml").write_text("attack: {target: circle}\n")
    return metrics, times


def test_the_detection_results_of_a_run_are_kept_with_the_filtered_backdoor_beside_the_full_one(tmp_path):
    import json
    from clipshield.detection_results import write
    metrics, times = _detection_run(tmp_path)
    out = tmp_path / "results/detection"
    md = write(metrics, times, tmp_path / "params.yaml", ["badnet", "blended", "wanet"], [0, 1], out).read_text()
    assert "| badnet | backdoored model | 0.900 | – | 0.900 | 0.5 | 10 / 1000 |" in md
    assert "| wanet | backdoored model | 0.250 | – | 0.250 | 0.5 | 10 / 1000 |" in md and "| blended |" not in md
    assert "| badnet | 0 | dao | 3 of 10 | 0.990 / 0.980 | 0.125 / 0.960 |" in md
    assert "| wanet | 0 |" not in md  # scored, never filtered
    found = json.loads((out / "summary.json").read_text())
    assert found["badnet"]["aurocs"]["backdoored"] == {"k_distance": 0.9, "dao": 0.9}
    assert found["badnet"]["filtered"] == {"0": {"asr": 0.125, "zeroshot_top1": 0.96}}
    assert found["wanet"]["filter"] is None and found["wanet"]["filtered"] == {}
    assert sorted(f.name for f in (out / "metrics").iterdir()) == [
        "backdoor-badnet-s0.json", "backdoor-wanet-s0.json", "detect-badnet.json", "detect-wanet.json",
        "filter-badnet.json", "filtered-badnet-s0.json"]
    assert json.loads((out / "machine.json").read_text()) == {"cpu": "AMD EPYC (2 cores, no AVX-512)"}
    assert (out / "params.yaml").read_text() == "attack: {target: circle}\n"


def test_detection_results_need_scores_and_one_machine(tmp_path):
    import json
    from clipshield.detection_results import write
    metrics, times = _detection_run(tmp_path)
    with pytest.raises(ValueError, match="holds no detect-<trigger>.json for blended: run the detect stages"):
        write(metrics, times, tmp_path / "params.yaml", ["blended"], [0], tmp_path / "out")
    (times / "detect@wanet.json").write_text(json.dumps({"stage": "detect@wanet", "seconds": 9.0, "cpu": "Intel Xeon",
                                                         "cores": 2, "avx512": True}))
    with pytest.raises(ValueError, match="name AMD EPYC .*; Intel Xeon .*; collect the results of one run"):
        write(metrics, times, tmp_path / "params.yaml", ["badnet", "wanet"], [0], tmp_path / "out")
    with pytest.raises(ValueError, match=r"name AMD EPYC \(2 cores, no AVX-512\), not Intel Xeon; collect"):
        write(metrics, times, tmp_path / "params.yaml", ["badnet"], [0], tmp_path / "out", cpu="Intel Xeon")
    for f in times.iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="no record of the detect stages names their CPU .* give it, e.g. --cpu"):
        write(metrics, times, tmp_path / "params.yaml", ["badnet"], [0], tmp_path / "out")
    write(metrics, times, tmp_path / "params.yaml", ["badnet"], [0], tmp_path / "out", cpu="Intel Xeon (2 cores)")
    assert json.loads((tmp_path / "out/machine.json").read_text()) == {"cpu": "Intel Xeon (2 cores)"}
