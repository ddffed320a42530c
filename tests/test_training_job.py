"""`ray job submit -- python -m student.train --stage preference` against a `ray start --head` cluster.

A separate head node (own ports and temp dir, started as our own process group and stopped at the
end). On an existing run directory (a d2s checkpoint and annotated preference rows), the first job
trains with 2 workers and is stopped (`ray job stop`) after a registered checkpoint; the second job
is `--resume` with ONE worker: a different data-parallel world size, so the resume is weights-only
(DeepSpeed ZeRO optimizer shards are partitioned by world size), and it finishes the stage and
exports the final student.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import RAY, ray_head
from training_checks import registered_checkpoints, stage_records
from training_rows import prepare_run, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 30, 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head_node():
    """(job server URL, env) of a fresh `ray start --head --block` (tests/ray_nodes.py)."""
    with ray_head(num_cpus=8) as head:
        yield head["dashboard"], head["env"]


def _existing_run(tmp: Path) -> tuple[Path, Path]:
    """A run directory holding a d2s checkpoint (an upcycled tiny student) and annotated preference rows."""
    from transformers import AutoProcessor

    from student.model import build_student, export, get_preset, load_model, upcycle

    run, _ = prepare_run(tmp / "run", ("preference",), rows_per_stage=4, copies=2 * STEPS, parquet=True)
    processor = AutoProcessor.from_pretrained(str(run / "teacher"))
    teacher = load_model(run / "teacher")
    student = build_student(get_preset("tiny"), processor.tokenizer, seed=0)
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    export(upcycle(student, 4, 2), processor, run / "stages" / "d2s" / "hf")
    recipe = tmp / "recipe.yaml"
    from actors.recipe import recipe_dict

    recipe.write_text(yaml.safe_dump(recipe_dict(tiny_recipe(batch_size=4))))
    return run, recipe


def _submit(url: str, env: dict, args: list[str], *, wait: bool, sid: str) -> subprocess.CompletedProcess:
    cmd = (f"cd {REPO} && OMP_NUM_THREADS=1 {sys.executable} -m student.train --stage preference --no-progress "
           + " ".join(args))
    deadline = time.time() + 120
    while True:  # `ray job list` answers before the head's job agent is up: retry the submit until it is
        out = subprocess.run([RAY, "job", "submit", "--address", url, "--submission-id", sid,
                              *([] if wait else ["--no-wait"]), "--", "bash", "-c", cmd],
                             env=env, capture_output=True, text=True, timeout=540)
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > deadline:
            return out
        time.sleep(3)


def test_job_submit_preference_then_resume_at_another_world_size(head_node, tmp_path, ray_cluster):
    # ray_cluster: the session's own local Ray, only to write the Parquet rows (never the head node)
    url, env = head_node
    run, recipe = _existing_run(tmp_path)
    common = ["--run-dir", str(run), "--recipe", str(recipe), "--data", str(run / "data"), "--max-steps", str(STEPS),
              "--checkpoint-every", str(EVERY)]
    t0 = time.time()
    first = _submit(url, env, [*common, "--workers", "2"], wait=False, sid=f"pref-a-{os.getpid()}")
    assert first.returncode == 0, first.stderr
    deadline = time.time() + 300
    while not registered_checkpoints(run, "preference"):
        assert time.time() < deadline, "no checkpoint registered by the first job in 300 s"
        time.sleep(0.5)
    stop = subprocess.run([RAY, "job", "stop", "--address", url, f"pref-a-{os.getpid()}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    t1 = time.time()
    killed_at = max(r["step"] for r in stage_records(run, "preference"))
    assert killed_at < STEPS, "the first job finished before it was stopped"

    second = _submit(url, env, [*common, "--workers", "1", "--resume"], wait=True, sid=f"pref-b-{os.getpid()}")
    t2 = time.time()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    print(f"\njob 1 until stopped at step {killed_at}: {t1 - t0:.1f}s; job 2 (resume, 1 worker): {t2 - t1:.1f}s")

    steps = [r["step"] for r in stage_records(run, "preference")]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert (steps[restart] - 1) % EVERY == 0 and steps[restart] > 1  # continued after a checkpoint
    assert steps[restart:] == list(range(steps[restart], STEPS + 1))
    summary = json.loads((run / "stages" / "preference" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["resumed_weights_only"]
    assert (run / "stages" / "preference" / "hf" / "config.json").exists()
    assert json.loads((run / "student" / "parameters.json").read_text())["num_experts"] == 4
    assert "final student:" in second.stdout
