"""Ablation scaffolding: arms resolve through the real recipe loader, the plan shares identical runs,
and the aggregation (mean +- std, verdicts) is right on numbers whose answer is known by hand."""
import math

import pytest

from actors.recipe import load_recipe
from student.ablate import ABLATIONS, AblationConfig, Arm, aggregate, arm_recipe, mean_std, plan, results_table, verdict
from student.ablate.run import DEFAULT_RECIPE, write_results

BASE = load_recipe(DEFAULT_RECIPE)


def test_every_arm_resolves_and_varies_only_what_the_paper_varies():
    for ab in ABLATIONS.values():
        assert len(ab.arms) >= 2 and set(ab.metrics)
        for arm in ab.arms:
            r = arm_recipe(BASE, arm)
            assert r.world == BASE.world and all(s in r.stages for s in arm.stages)
    sft, kd = (arm_recipe(BASE, a) for a in ABLATIONS["mod-kd-vs-sft"].arms)
    assert (sft.stages["d2s"].loss.kd, sft.stages["d2s"].loss.ce) == (0.0, 1.0)
    assert (kd.stages["d2s"].loss.kd, kd.stages["d2s"].loss.ce) == (1.0, 1.0)
    assert (kd.model.num_experts, kd.model.top_k) == (4, 2)
    assert all(a.skip == ("d2d",) for a in ABLATIONS["mod-kd-vs-sft"].arms)  # d2d is KL-only: no SFT version
    both, resp = (arm_recipe(BASE, a) for a in ABLATIONS["mod-distill-tokens"].arms)
    assert both.stages["d2d"].loss.kd_positions == "response+instruction" == both.stages["d2s"].loss.kd_positions
    assert resp.stages["d2s"].loss.kd_positions == "response"
    dense, sparse = (arm_recipe(BASE, a) for a in ABLATIONS["mod-dense-vs-sparse"].arms)
    assert (dense.model.num_experts, dense.model.top_k, sparse.model.num_experts, sparse.model.top_k) == (1, 1, 4, 1)
    kd_arms = {a.name: a for a in ABLATIONS["kd-stages"].arms}
    pt = arm_recipe(BASE, kd_arms["PT+SFT"]).stages["dpt"].loss
    assert (pt.ce, pt.res, pt.vis, pt.rel) == (1.0, 0.0, 0.0, 0.0)
    dpt = arm_recipe(BASE, kd_arms["DPT+SFT"]).stages["dpt"].loss
    assert (dpt.res, dpt.vis, dpt.rel) == (1.0, 1.0, 0.5)
    assert kd_arms["PT+DFT"].skip == ("sft",) and kd_arms["PT+DFT"].evaluated_stage == "dft"
    matched = arm_recipe(BASE, kd_arms["DPT+SFT, SFT 2x"]).stages
    three = arm_recipe(BASE, kd_arms["DPT+SFT+DFT"]).stages
    assert matched["sft"].max_steps == three["sft"].max_steps + three["dft"].max_steps  # step-matched control


def test_a_misspelt_override_fails_naming_it():
    with pytest.raises(ValueError, match=r"stages\.d2s\.loss\.kd_weight"):
        arm_recipe(BASE, Arm("typo", ("d2s",), {"stages": {"d2s": {"loss": {"kd_weight": 1.0}}}}))
    with pytest.raises(ValueError, match="no stage"):
        arm_recipe(BASE, Arm("missing", ("nope",)))


def test_plan_shares_identical_runs_and_keeps_arms_apart(tmp_path):
    cfg = AblationConfig(out=tmp_path, seeds=(0, 1, 2), max_steps=5)
    steps = plan(ABLATIONS["mod-preference"], cfg)
    assert steps[0].kind == "teacher" and "--max-steps" not in steps[0].argv
    last = steps[-1]  # the teacher's reference score, on the teacher run's world
    assert (last.kind, last.arm, last.run_dir, last.data_dir) == ("eval", "", tmp_path / "teacher",
                                                                   tmp_path / "teacher" / "world")
    given = plan(ABLATIONS["mod-preference"], AblationConfig(out=tmp_path, teacher=tmp_path / "t"))
    assert given[0].kind == "train" and "--teacher" in given[0].argv and given[-1].data_dir.parent == given[0].run_dir
    evals = [s for s in steps if s.kind == "eval" and s.arm]
    assert len(evals) == 6  # 2 arms x 3 seeds
    runs = {(s.arm, s.seed): s.run_dir for s in evals}
    assert runs[("mimic", 0)] == runs[("mimic+preference", 0)] != runs[("mimic", 1)]  # prefix arms share a run
    assert {s.stage for s in evals if s.arm == "mimic"} == {"d2s"}
    train = [s for s in steps if s.kind == "train"]
    assert all(s.argv[s.argv.index("--max-steps") + 1] == "5" for s in train)
    # the default arm of two ablations is the same run; a changed loss or a skipped stage is another
    tokens = {s.arm: s.run_dir for s in plan(ABLATIONS["mod-distill-tokens"], cfg) if s.kind == "eval" and s.seed == 0}
    assert tokens["response"] == runs[("mimic", 0)] != tokens["response+instruction"]
    kd = {s.arm: s.run_dir for s in plan(ABLATIONS["mod-kd-vs-sft"], cfg) if s.kind == "eval" and s.seed == 0}
    assert kd["SFT"] != kd["KD"] != runs[("mimic", 0)]
    kd_stages = {s.arm: s.run_dir for s in plan(ABLATIONS["kd-stages"], cfg) if s.kind == "eval" and s.seed == 0}
    assert kd_stages["DPT+SFT"] == kd_stages["DPT+SFT+DFT"] != kd_stages["DPT+DFT"]
    assert not any(p.exists() for p in tmp_path.iterdir())  # planning writes nothing


def test_mean_std_and_aggregate():
    assert mean_std([0.5, 0.7, 0.9]) == (pytest.approx(0.7), pytest.approx(0.2), 3)
    assert mean_std([0.4]) == (0.4, None, 1)
    assert mean_std([None, float("nan")]) == (None, None, 0)
    rows = [{"arm": "a", "seed": s, "summary": {"vqa_accuracy": v}} for s, v in ((2, 0.9), (0, 0.5), (1, 0.7))]
    agg = aggregate(rows, ["vqa_accuracy"])
    assert agg["a"]["vqa_accuracy"]["values"] == [0.5, 0.7, 0.9] and agg["a"]["vqa_accuracy"]["seeds"] == [0, 1, 2]
    table = results_table(["a", "b"], ["vqa_accuracy", "hallucination_resp"], agg, teacher={"vqa_accuracy": 0.95})
    assert "| a | 3 | 70.0 ± 20.0 | - |" in table and "| b | 0 | - | - |" in table
    assert "hallucination_resp ↓" in table and "| teacher (reference) | 1 | 95.0 | - |" in table


def test_verdicts():
    def agg_of(a, b, metric="m"):
        return aggregate([{"arm": arm, "seed": i, "summary": {metric: v}}
                          for arm, vals in (("A", a), ("B", b)) for i, v in enumerate(vals)], [metric])
    assert verdict(agg_of([0.8, 0.81, 0.82], [0.5, 0.51, 0.52]), "A", "B", "m", False)["result"] == "reproduces"
    assert verdict(agg_of([0.5, 0.51, 0.52], [0.8, 0.81, 0.82]), "A", "B", "m", False)["result"] == "contradicted"
    assert verdict(agg_of([0.5, 0.51, 0.52], [0.8, 0.81, 0.82]), "A", "B", "m", True)["result"] == "reproduces"
    noisy = verdict(agg_of([0.5, 0.9, 0.7], [0.6, 0.4, 0.65]), "A", "B", "m", False)
    assert noisy["result"] == "within seed noise" and noisy["difference"] == pytest.approx(0.7 - 0.55)
    assert noisy["se"] == pytest.approx(math.sqrt(0.2 ** 2 / 3 + mean_std([0.6, 0.4, 0.65])[1] ** 2 / 3))
    assert verdict(agg_of([0.9], [0.1]), "A", "B", "m", False)["result"].startswith("within seed noise")
    assert verdict(agg_of([0.9], [0.1]), "A", "C", "m", False)["result"] == "not measured"


def test_write_results_refuses_without_real_evaluations(tmp_path):
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        write_results(ABLATIONS["mod-preference"], AblationConfig(out=tmp_path), "python -m student.ablate ...")
