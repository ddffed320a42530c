"""The LLaVA-MoD chain on Ray Train + DeepSpeed (2 workers, ZeRO-2): init -> d2d -> d2s -> preference.

One run of the real stage chaining (student.training.pipeline.run_stages) on a repeated batch, during
which one training worker is killed (SIGKILL) in the middle of d2s, after its first checkpoint. All
assertions read that one run: losses fall, only each stage's trainable parameters change, d2s
resumed from its last checkpoint and finished, checkpoints and the final student are where the
run-dir layout says.
"""
import json
import os
import signal
import threading
import time

import pytest

from training_checks import diff_by_trainability, params, stage_records
from training_rows import in_memory, prepare_run, tiny_recipe

STAGES = ("init", "d2d", "d2s", "preference")
STEPS, EVERY, KILL_STAGE = 8, 3, "d2s"
KILL_STEPS = 40  # the stage whose worker is killed runs longer, so the kill lands mid-stage
pytestmark = pytest.mark.slow


def _train_workers() -> list:
    """Ray Train worker processes of *this* test session: descendants of this process (the local Ray's
    raylet is our child), named by Ray's process title. Never anyone else's on a shared machine."""
    import psutil

    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _registered_checkpoints(run, stage: str) -> int:
    """Checkpoints Ray Train's controller has registered for the stage's current run (it picks up a
    reported checkpoint at its next poll of the workers, every 2 s by default: a failure before that
    restarts from the previous one)."""
    record = run / "stages" / stage / "run.json"
    if not record.exists():
        return 0
    snapshot = run / "ray" / json.loads(record.read_text())["name"] / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results", [])) if snapshot.exists() else 0
    except ValueError:  # being written
        return 0


def _kill_worker_when(run, stage: str, last_step: int, done: threading.Event, killed: dict) -> None:
    """SIGKILL one Ray Train worker once `stage` has a registered checkpoint and is before `last_step`."""
    metrics = run / "metrics.jsonl"
    while not done.is_set():
        if metrics.exists() and _registered_checkpoints(run, stage):
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if f'"stage": "{stage}"' in x]
            if steps and max(steps) < last_step:
                workers = _train_workers()
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.update(pid=workers[-1].pid, step=max(steps))
                    return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mod_run(tmp_path_factory, ray_cluster):
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.stage_model import stage_start_model

    # one distinct example per stage, repeated: every global batch of 4 is the same batch
    steps = {s: KILL_STEPS if s == KILL_STAGE else STEPS for s in STAGES}
    run = prepare_run(tmp_path_factory.mktemp("mod") / "run", STAGES, rows_per_stage=1,
                      copies={s: 4 * n for s, n in steps.items()})
    recipe = tiny_recipe(batch_size=4, max_steps=steps)
    init_start = params(stage_start_model("init", run, recipe)[0])
    done, killed = threading.Event(), {}
    watcher = threading.Thread(target=_kill_worker_when, args=(run, KILL_STAGE, KILL_STEPS - 4, done, killed), daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        summaries = run_stages(STAGES, run, recipe, lambda r, s, d: in_memory(d / "data" / s),
                               TrainOptions(checkpoint_every=EVERY, max_failures=1, progress=False))
    finally:
        done.set()
    print(f"chain of {len(STAGES)} stages: {time.time() - t0:.1f}s; summaries:",
          {s: {k: summaries[s].get(k) for k in ("wall_s", "step_time_s", "teacher_wait_s")} for s in summaries})
    return run, recipe, summaries, init_start, killed


def test_every_stage_ran_its_steps_and_its_loss_fell(mod_run):
    run, _, summaries, _, _ = mod_run
    for stage in STAGES:
        recs = stage_records(run, stage)
        steps = [r["step"] for r in recs]
        if stage != KILL_STAGE:
            assert steps == list(range(1, STEPS + 1)), stage
        assert steps[-1] == (KILL_STEPS if stage == KILL_STAGE else STEPS)
        first, last = recs[0]["loss/total"], recs[-1]["loss/total"]
        assert last < first, f"{stage}: loss {first} -> {last}"
        assert summaries[stage]["world_size"] == 2 and summaries[stage]["zero_stage"] == 2


def test_killed_worker_resumed_from_its_last_checkpoint(mod_run):
    run, _, summaries, _, killed = mod_run
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


def test_metrics_carry_the_stage_terms(mod_run):
    run = mod_run[0]
    d2s = stage_records(run, "d2s")[-1]
    for key in ("loss/ce", "loss/kl", "loss/aux", "lr", "tokens_per_s", "teacher_wait_s", "time_s", "epoch",
                "router/layer0/expert0", "router/layer0/entropy"):
        assert key in d2s, key
    assert abs(sum(d2s[f"router/layer0/expert{e}"] for e in range(4)) - 1) < 1e-6
    pref = stage_records(run, "preference")[-1]
    assert {"loss/dpo", "dpo/margin", "dpo/accuracy", "loss/aux"} <= set(pref)
    d2d = stage_records(run, "d2d")[-1]
    assert "loss/kl" in d2d and "loss/ce" not in d2d and "loss/aux" not in d2d  # dense student: no aux
    assert list((run / "tb").glob("d2s/events.out.tfevents.*"))


def test_only_trainable_parameters_changed(mod_run):
    from student.model import load_model, trainable_parameter_names, upcycle

    run, recipe, _, init_start, _ = mod_run
    hf = {s: run / "stages" / s / "hf" for s in STAGES}
    m = recipe.model
    starts = {
        "init": init_start,
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


def test_chaining_layout_and_final_student(mod_run):
    run = mod_run[0]
    for stage in STAGES:
        assert (run / "stages" / stage / "hf" / "config.json").exists()
        info = json.loads((run / "stages" / stage / "run.json").read_text())
        assert info["status"] == "finished" and (run / "ray" / info["name"]).is_dir()
    names = {json.loads((run / "stages" / s / "run.json").read_text())["name"] for s in STAGES}
    assert len(names) == len(STAGES)  # every stage its own Ray Train run
    report = json.loads((run / "student" / "parameters.json").read_text())
    assert report["num_experts"] == 4 and report["active"] < report["total"]
