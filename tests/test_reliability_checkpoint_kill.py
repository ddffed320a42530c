"""A process killed in the middle of a checkpoint save (issue #9): the previous checkpoint still loads.

A real stage (init: CE, 2 workers, ZeRO-2, a checkpoint every 2 steps, rows held in memory). Once
Ray Train has registered one checkpoint, a watcher waits for the next checkpoint folder to appear in
storage (Ray is copying it there inside `ray.train.report`; the controller registers it only at its
next poll of the workers, up to 2 s later) and SIGKILLs a training worker right then. Ray Train
restarts the worker group from the last *registered* checkpoint: the stage resumes right after the
previous save with the full engine state, never from the half-saved one, trains every sample of
the epoch exactly once, and the killed save's staging folder is gone at the end.
"""
import os
import signal
import threading
import time

import pytest

from training_checks import registered_checkpoints, stage_experiment, stage_records, train_workers
from training_rows import in_memory, prepare_run, tiny_recipe

STAGE, STEPS, EVERY = "init", 16, 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _kill_during_save(run, done: threading.Event, seen: dict) -> None:
    workers = []
    while not done.is_set():
        experiment = stage_experiment(run, STAGE)
        registered = registered_checkpoints(run, STAGE)
        if registered:
            workers = workers or train_workers()
            fresh = [d for d in experiment.glob("checkpoint_*") if d.is_dir() and d.name not in registered]
            if fresh and workers:
                files = sorted(str(p.relative_to(fresh[0])) for p in fresh[0].rglob("*") if p.is_file())
                os.kill(workers[-1].pid, signal.SIGKILL)
                seen.update(pid=workers[-1].pid, unregistered=fresh[0].name, files_at_kill=files,
                            registered=registered, last_registered_step=max(registered.values()))
                return
        time.sleep(0.002)


def test_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, ray_cluster):
    from student.training.checkpoint import staging_dir
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.sample_log import effective_steps, read_lines, sample_counts

    run, rows = prepare_run(tmp_path / "run", (STAGE,), rows_per_stage=1, copies={STAGE: 4 * STEPS})
    recipe = tiny_recipe(batch_size=4, max_steps={STAGE: STEPS})
    done, seen = threading.Event(), {}
    threading.Thread(target=_kill_during_save, args=(run, done, seen), daemon=True).start()
    t0 = time.time()
    try:
        summary = run_stages((STAGE,), run, recipe, lambda r, s, d: in_memory(rows[STAGE]),
                             TrainOptions(checkpoint_every=EVERY, max_failures=1, progress=False))[STAGE]
    finally:
        done.set()
    experiment = stage_experiment(run, STAGE)
    complete = sorted(str(p.relative_to(d)) for d in experiment.glob("checkpoint_*")
                      if d.is_dir() and d.name in registered_checkpoints(run, STAGE) for p in d.rglob("*") if p.is_file())
    steps = [r["step"] for r in stage_records(run, STAGE)]
    print(f"\nkilled worker {seen.get('pid')} while {seen.get('unregistered')} was being saved "
          f"({len(seen.get('files_at_kill', []))} files there at the kill; a registered checkpoint has "
          f"{len(complete) // max(1, len(registered_checkpoints(run, STAGE)))}); last registered step "
          f"{seen.get('last_registered_step')}; steps {steps}; {time.time() - t0:.1f}s")

    assert seen, "no checkpoint save was caught in progress"
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(restarts) == 1, steps
    resumed_at = steps[restarts[0]]
    # resumed right after the last registered checkpoint: the one being saved at the kill was not loaded
    assert resumed_at == seen["last_registered_step"] + 1
    assert steps[restarts[0]:] == list(range(resumed_at, STEPS + 1))
    assert not summary["resumed_weights_only"]  # the previous checkpoint loaded whole: weights and Adam moments
    assert seen["unregistered"] not in registered_checkpoints(run, STAGE)  # never became a checkpoint Ray would load
    # every sample of the epoch trained on exactly once, across the two attempts
    counts = sample_counts(effective_steps(read_lines(run / "stages" / STAGE)[0]))
    assert list(counts) == [0] and len(counts[0]) == 4 * STEPS and set(counts[0].values()) == {1}
    assert summary["samples"]["attempts"] == 2 and summary["samples"]["repeated_in_epoch"] == 0
    # the killed save's staging folder was removed by that rank's next save
    assert not any(staging_dir(experiment.name, r).exists() for r in range(2))
    assert (run / "stages" / STAGE / "hf" / "config.json").exists()
