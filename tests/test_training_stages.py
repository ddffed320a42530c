"""Every training stage on Ray Train + DeepSpeed (2 workers, ZeRO-2), through the real stage chaining.

One run directory, two chains of `student.training.pipeline.run_stages` on repeated batches:
LLaVA-KD dpt -> sft -> dft, then LLaVA-MoD init -> d2d -> d2s -> preference, during which one
training worker is killed (SIGKILL) in the middle of d2s, after a checkpoint. All assertions read
that one run (each fit costs ~15-40 s of Ray start-up on 2 shared cores): losses fall, only each
stage's trainable parameters change, d2s resumed from its last checkpoint and finished, checkpoints
and the final students are where the run-dir layout says.
"""
import json
import os
import signal
import threading
import time

import pytest

from training_checks import diff_by_trainability, params, registered_checkpoints, stage_records, train_workers
from training_rows import in_memory, prepare_run, tiny_recipe

KD, MOD = ("dpt", "sft", "dft"), ("init", "d2d", "d2s", "preference")
STAGES = KD + MOD
STEPS, EVERY, KILL_STAGE = 6, 3, "d2s"
KILL_STEPS = 40  # the stage whose worker is killed runs longer, so the kill lands mid-stage
pytestmark = pytest.mark.slow


def _kill_worker_when(run, stage: str, last_step: int, done: threading.Event, killed: dict) -> None:
    """SIGKILL one Ray Train worker once `stage` has a registered checkpoint and is before `last_step`."""
    metrics = run / "metrics.jsonl"
    while not done.is_set():
        if metrics.exists() and registered_checkpoints(run, stage):
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if f'"stage": "{stage}"' in x]
            if steps and max(steps) < last_step:
                workers = train_workers()
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.update(pid=workers[-1].pid, step=max(steps))
                    return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.stage_model import stage_start_model

    steps = {s: KILL_STEPS if s == KILL_STAGE else STEPS for s in STAGES}
    # one distinct example per stage, repeated: every global batch of 4 is the same batch
    run, rows = prepare_run(tmp_path_factory.mktemp("stages") / "run", STAGES, rows_per_stage=1,
                            copies={s: 4 * n for s, n in steps.items()})
    recipe = tiny_recipe(batch_size=4, max_steps=steps)
    starts = {s: params(stage_start_model(s, run, recipe)[0]) for s in ("dpt", "init")}
    data = lambda r, stage, d: in_memory(rows[stage])  # noqa: E731
    options = TrainOptions(checkpoint_every=EVERY, max_failures=1, progress=False)
    t0 = time.time()
    summaries = run_stages(KD, run, recipe, data, options)
    kd_student = json.loads((run / "student" / "parameters.json").read_text())
    done, killed = threading.Event(), {}
    threading.Thread(target=_kill_worker_when, args=(run, KILL_STAGE, KILL_STEPS - 4, done, killed), daemon=True).start()
    try:
        summaries.update(run_stages(MOD, run, recipe, data, options))
    finally:
        done.set()
    print(f"\n{len(STAGES)} stages in {time.time() - t0:.1f}s; per stage (fit, worker set-up, train loop, "
          "step, data wait) s:")
    for s, v in summaries.items():
        print(f"  {s:<11}" + " ".join(f"{v.get(k, float('nan')):7.2f}"
                                     for k in ("fit_s", "setup_s", "wall_s", "step_time_s", "teacher_wait_s")))
    return run, recipe, summaries, starts, killed, kd_student


def test_every_stage_ran_its_steps_and_its_loss_fell(trained):
    run, _, summaries, _, _, _ = trained
    for stage in STAGES:
        recs = stage_records(run, stage)
        steps = [r["step"] for r in recs]
        if stage != KILL_STAGE:
            assert steps == list(range(1, STEPS + 1)), stage
        assert steps[-1] == (KILL_STEPS if stage == KILL_STAGE else STEPS)
        first, last = recs[0]["loss/total"], recs[-1]["loss/total"]
        assert last < first, f"{stage}: loss {first} -> {last}"
        assert summaries[stage]["world_size"] == 2 and summaries[stage]["zero_stage"] == 2


def test_killed_worker_resumed_from_its_last_checkpoint(trained):
    run, _, summaries, _, killed, _ = trained
    assert killed, "the worker was never killed (stage finished first?)"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    steps = [r["step"] for r in stage_records(run, KILL_STAGE)]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) == 1, steps
    resumed_at = steps[restarts[0]]
    assert (resumed_at - 1) % EVERY == 0 and resumed_at - 1 >= EVERY  # continued right after a checkpoint
    assert steps[restarts[0]:] == list(range(resumed_at, KILL_STEPS + 1))
    assert not summaries[KILL_STAGE]["resumed_weights_only"]  # same world size: full engine state


def test_metrics_carry_the_stage_terms(trained):
    run = trained[0]
    d2s = stage_records(run, "d2s")[-1]
    for key in ("loss/ce", "loss/kl", "loss/aux", "lr", "tokens_per_s", "teacher_wait_s", "time_s", "epoch",
                "router/layer0/expert0", "router/layer0/entropy"):
        assert key in d2s, key
    assert abs(sum(d2s[f"router/layer0/expert{e}"] for e in range(4)) - 1) < 1e-6
    assert {"loss/dpo", "dpo/margin", "dpo/accuracy", "loss/aux"} <= set(stage_records(run, "preference")[-1])
    d2d = stage_records(run, "d2d")[-1]
    assert "loss/kl" in d2d and "loss/ce" not in d2d and "loss/aux" not in d2d  # dense student: no aux
    for stage in ("dpt", "dft"):  # CE + MDist (response, visual) + RDist
        assert {"loss/ce", "loss/res", "loss/vis", "loss/rel"} <= set(stage_records(run, stage)[-1])
    assert set(stage_records(run, "sft")[-1]) >= {"loss/ce"} and "loss/res" not in stage_records(run, "sft")[-1]
    assert list((run / "tb").glob("d2s/events.out.tfevents.*"))


def test_only_trainable_parameters_changed(trained):
    from student.model import load_model, trainable_parameter_names, upcycle

    run, recipe, _, starts, _, _ = trained
    hf = {s: run / "stages" / s / "hf" for s in STAGES}
    m = recipe.model
    starts = {
        **starts,
        "sft": params(load_model(hf["dpt"])),
        "dft": params(load_model(hf["sft"])),
        "d2d": params(load_model(hf["init"])),
        "d2s": params(upcycle(load_model(hf["d2d"]), m.num_experts, m.top_k, layers=m.moe_layers, seed=recipe.seed)),
        "preference": params(load_model(hf["d2s"])),
    }
    for stage in STAGES:
        after = params(load_model(hf[stage]))
        trainable = trainable_parameter_names(list(after), stage)
        frozen_delta, unchanged = diff_by_trainability(starts[stage], after, trainable)
        assert frozen_delta == 0.0, stage
        assert len(unchanged) < len(trainable) / 2, f"{stage}: trainable params that did not move: {sorted(unchanged)[:5]}"


def test_chaining_layout_and_final_students(trained):
    run, _, _, _, _, kd_student = trained
    for stage in STAGES:
        assert (run / "stages" / stage / "hf" / "config.json").exists()
        info = json.loads((run / "stages" / stage / "run.json").read_text())
        assert info["status"] == "finished" and (run / "ray" / info["name"]).is_dir()
    names = {json.loads((run / "stages" / s / "run.json").read_text())["name"] for s in STAGES}
    assert len(names) == len(STAGES)  # every stage its own Ray Train run
    assert kd_student["num_experts"] == 0  # after dft: LLaVA-KD's student stays dense
    report = json.loads((run / "student" / "parameters.json").read_text())  # after preference: the MoE
    assert report["num_experts"] == 4 and report["active"] < report["total"]
