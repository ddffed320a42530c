"""Elastic training, live (issue #7): `--workers 1:2` grows to 2 workers when a node joins mid-stage.

A private cluster (`ray start --head`, tests/ray_nodes.py) whose head advertises one unit of the
`student_gpu` pool, so only MIN = 1 student worker fits (the trainer asks for one unit per worker,
`trainer.worker_resources`; Ray Train's elastic policy counts workers by the pool's units).
`python -m student.train --stage init --workers 1:2 --resize-interval 1` trains against it
(RAY_ADDRESS, as under `ray job submit`); once it has trained a step, a second node with one more
`student_gpu` joins. Ray Train sees the node at its autoscaling coordinator's next refresh (every
20 s in Ray 2.60, not configurable), decides at its next resize check (1 s here, 60 s by default),
stops the 1-worker group and restarts at 2 workers from the last registered checkpoint. World size
1 -> 2 cannot load the ZeRO optimizer shards, so the resume is weights-only; the global batch stays 4
(2 workers x 2). Checks: the resize happened, resumed from the last checkpoint Ray had registered
when the 1-worker group stopped, finished every step, and the sample log counts every id of the
epoch exactly once. "Exactly once" across a restart: the steps the 1-worker attempt ran after that
checkpoint are redone by the 2-worker attempt, and the redone steps replace the earlier ones (the
sample log's rule, student/training/sample_log.py); what stands trains each id once.
"""
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ray_nodes import ray_head, ray_worker_node
from training_checks import registered_checkpoints
from training_rows import prepare_run, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
STAGE, STEPS, EVERY, BATCH = "init", 300, 5, 4
# spare rows: the two shards are split dynamically after the resize and ended 16+ rows apart in CI
# (one rank's short last batch at step 299); 96 covers what each rank's block prefetch can hold
ROWS = BATCH * STEPS + 96
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for text in lines:
        try:
            rec = json.loads(text)
        except ValueError:  # being written
            continue
        if rec.get("stage") == STAGE:
            out.append(rec)
    return out


def _watch(run: Path, done: threading.Event, seen: dict) -> None:
    """Until the first 2-worker step: the last registered checkpoint (what a restart loads) and when
    the first step at each world size was logged."""
    while not done.is_set():
        recs = _records(run)
        for rec in recs:
            seen.setdefault(f"first_step_at_world{rec['world_size']}", (rec["step"], time.time()))
        if any(r["world_size"] == 2 for r in recs):
            return
        steps = registered_checkpoints(run, STAGE).values()
        if steps:
            seen["last_registered"] = max(seen.get("last_registered", 0), max(steps))
        time.sleep(0.05)


def _run_dir(tmp: Path) -> tuple[Path, Path]:
    run, _ = prepare_run(tmp / "run", (STAGE,), rows_per_stage=1, copies={STAGE: ROWS}, parquet=True)
    recipe = tmp / "recipe.yaml"
    from actors.recipe import recipe_dict

    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_recipe(batch_size=BATCH))))
    return run, recipe


def test_node_join_grows_the_worker_group_and_every_sample_counts_once(tmp_path, ray_cluster):
    # ray_cluster: the session's own local Ray, only to write the Parquet rows (never the private cluster)
    from student.training.sample_log import effective_steps, read_lines, sample_counts

    run, recipe = _run_dir(tmp_path)
    with ray_head(num_cpus=4, resources={"student_gpu": 1}) as head:
        cmd = [sys.executable, "-m", "student.train", "--stage", STAGE, "--run-dir", str(run), "--recipe", str(recipe),
               "--data", str(run / "data"), "--workers", "1:2", "--resize-interval", "1", "--max-steps", str(STEPS),
               "--checkpoint-every", str(EVERY), "--no-progress", "--no-eval"]
        log = (tmp_path / "driver.log").open("w")
        t0 = time.time()
        driver = subprocess.Popen(cmd, cwd=REPO, env={**head["env"], "RAY_ADDRESS": head["address"]},
                                  stdout=log, stderr=subprocess.STDOUT)
        done, seen = threading.Event(), {}
        watcher = threading.Thread(target=_watch, args=(run, done, seen), daemon=True)
        watcher.start()
        try:
            deadline = time.time() + 300
            while "first_step_at_world1" not in seen:
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.time() < deadline, "the 1-worker group trained no step in 300 s"
                time.sleep(0.2)
            seen["step_at_join"] = max(r["step"] for r in _records(run))
            with ray_worker_node(head, num_cpus=1, resources={"student_gpu": 1}) as joined_at:
                rc = driver.wait(timeout=420)
        finally:
            done.set()
            if driver.poll() is None:
                driver.kill()
            log.close()
    out = (tmp_path / "driver.log").read_text()
    assert rc == 0, out[-4000:]

    recs = _records(run)
    steps, worlds = [r["step"] for r in recs], [r["world_size"] for r in recs]
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) == 1, steps
    cut = restarts[0]
    assert set(worlds[:cut]) == {1} and set(worlds[cut:]) == {2}, worlds
    resumed_from = steps[cut] - 1
    trained_at_1 = steps[cut - 1]
    summary = json.loads((run / "stages" / STAGE / "summary.json").read_text())
    first2_step, first2_at = seen["first_step_at_world2"]
    print(f"\nnode joined {joined_at - t0:.1f}s after the driver started, at step {seen['step_at_join']}; the "
          f"1-worker group trained to step {trained_at_1}; last registered checkpoint: step "
          f"{seen.get('last_registered')}; the 2-worker loop started {summary['entered_at'] - joined_at:.1f}s and its "
          f"first step (step {first2_step}) was logged {first2_at - joined_at:.1f}s after the join; "
          f"stage finished {time.time() - t0:.1f}s after the driver started")

    # resized, from the last checkpoint Ray had registered, weights-only, same global batch
    assert resumed_from == seen["last_registered"] and resumed_from % EVERY == 0 and resumed_from >= EVERY
    assert steps[cut:] == list(range(resumed_from + 1, STEPS + 1))
    assert summary["world_size"] == 2 and summary["micro_batch"] == BATCH // 2 and summary["resumed_weights_only"]
    assert summary["resumed_from"] == {"step": resumed_from, "world_size": 1, "global_batch": BATCH}
    assert f"world size changed 1 -> 2: weights-only resume from the checkpoint of step {resumed_from}" in out
    assert f"global batch {BATCH} -> {BATCH}" in out

    # every id of the epoch once: the 1-worker steps after the checkpoint are superseded by the redone ones
    lines, torn = read_lines(run / "stages" / STAGE)
    attempts = sorted({r["attempt"] for r in lines})
    assert len(attempts) == 2 and torn == 0
    first = [r for r in lines if r["attempt"] == attempts[0]]
    assert {r["rank"] for r in first} == {0} and max(r["step"] for r in first) >= trained_at_1
    second = [r for r in lines if r["attempt"] == attempts[1]]
    assert {r["rank"] for r in second} == {0, 1} and {r["start_step"] for r in second} == {resumed_from}
    kept = effective_steps(lines)
    per_step: dict[int, int] = {}
    for r in kept:
        per_step[r["step"]] = per_step.get(r["step"], 0) + len(r["ids"])
    assert per_step == {s: BATCH for s in range(1, STEPS + 1)}  # one global batch of 4 per step, at both sizes
    counts = sample_counts(kept)
    assert list(counts) == [0] and len(counts[0]) == BATCH * STEPS and set(counts[0].values()) == {1}
    # in the raw lines an id appears twice only if the 1-worker group trained it after the checkpoint
    redone = {i for r in first if r["step"] > resumed_from for i in r["ids"]}
    twice = {i for i, n in Counter(i for r in lines for i in r["ids"]).items() if n > 1}
    assert twice <= redone
    assert summary["samples"] == {"rows": BATCH * STEPS, "distinct": BATCH * STEPS, "repeated_in_epoch": 0,
                                  "epochs": 1, "attempts": 2, "torn_lines": 0}
    assert (run / "stages" / STAGE / "hf" / "config.json").exists()
