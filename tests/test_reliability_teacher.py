"""Reliability of distillation against one shared teacher app (issue #9): real local Ray, a tiny
teacher on Serve with a small bounded queue, the real data plane and Ray Train + DeepSpeed.

* the teacher's tokenizer differs from the run's: `python -m student.train` refuses before any step;
  a student whose tokenizer differs from the teacher's is refused by the driver too;
* the teacher replica is killed in the middle of a d2d stage, while its rows are being annotated:
  the stage finishes without a trainer restart and every sample is distilled exactly once (the stage's sample log, its data ledger and the
  teacher cache count them);
* three student runs (separate `python -m student.train` drivers) share the app: all finish; the
  replica never holds more than max_ongoing_requests requests and its RSS stays bounded.

The app batches with a 0.2 s wait, so annotation is the slow part of a stage and a kill lands while
rows are still waiting for the teacher.
"""
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from reliability_runs import (
    REPO,
    cli_env,
    d2d_recipe_file,
    other_tokenizer,
    prepare_d2d_run,
)
from training_checks import stage_records

APP = "reliability-teacher"
MAX_ONGOING, MAX_QUEUED = 4, 8  # the queue bound; annotators keep <= 8 requests in flight per actor
RSS_BOUND_MB = 200  # growth of the replica's RSS over three concurrent runs (measured: docs/reliability.md)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def teacher_app(ray_cluster, tmp_path_factory):
    from teacher_service.app import ServiceConfig, deploy, shutdown
    from teacher_service.testing import save_tiny_teacher

    path = save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")
    deploy(ServiceConfig(model=str(path), name=APP, num_cpus=0.5, torch_threads=1, batch_wait_timeout_s=0.2,
                         max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED,
                         env_vars={"OMP_NUM_THREADS": "1"}))
    yield ray_cluster
    shutdown(APP)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(recipe file, a prepared d2d run directory to copy): 44 rows, 11 steps of 4."""
    root = tmp_path_factory.mktemp("reliability")
    recipe = d2d_recipe_file(root / "recipe.yaml")
    return recipe, prepare_d2d_run(root / "base", recipe)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(recipe file, a prepared d2d run directory to copy): 12 rows, one epoch of 3 steps."""
    root = tmp_path_factory.mktemp("reliability-small")
    recipe = d2d_recipe_file(root / "recipe.yaml", rows=(4, 8))
    return recipe, prepare_d2d_run(root / "base", recipe)


def _copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def _replica_stats() -> list[dict]:
    from ray import serve

    return serve.get_app_handle(APP).broadcast("get_stats").results(timeout_s=60)


def _train(recipe, run: Path, address: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "student.train", "--stage", "d2d", "--recipe", str(recipe), "--run-dir", str(run),
            "--teacher", APP, "--no-eval", "--no-progress", *extra]
    return subprocess.Popen(args, cwd=REPO, env=cli_env(address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _nothing_trained(run: Path) -> None:
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "ray").exists()  # no Ray Train run, hence no checkpoint
    assert not (run / "stages" / "d2d").exists()  # no run.json, no sample log, no summary


def test_vocabulary_mismatch_is_refused_before_any_step(teacher_app, base_run, tmp_path):
    from actors.pipeline import DataPlaneConfig, stage_dataset
    from actors.recipe import load_recipe
    from student.training.pipeline import TrainOptions, run_stages
    from teacher_service.identity import TokenizerHashMismatch

    recipe_file, base = base_run
    # the run's world (what the data plane tokenizes with) differs from the teacher's tokenizer: the CLI
    run = _copy(base, tmp_path / "world-differs")
    shutil.rmtree(run / "world" / "tokenizer")
    other_tokenizer().save_pretrained(run / "world" / "tokenizer")
    t0 = time.time()
    p = _train(recipe_file, run, teacher_app)
    out, err = p.communicate(timeout=300)
    print(f"\nCLI refused the mismatched teacher in {time.time() - t0:.1f}s: {err.strip().splitlines()[-1]}")
    assert p.returncode == 2, err[-3000:]
    assert f"error: teacher app '{APP}'" in err and "the data plane tokenizes with tok-" in err
    assert "distillation over different token ids is meaningless" in err and "Traceback" not in err
    _nothing_trained(run)

    # world and teacher agree, but the student d2d starts from was built with another tokenizer
    run = _copy(base, tmp_path / "student-differs")
    from student.model import build_processor, build_student, export, get_preset

    tok = other_tokenizer()
    shutil.rmtree(run / "stages" / "init" / "hf")
    export(build_student(get_preset("tiny"), tok, seed=0), build_processor(tok), run / "stages" / "init" / "hf")
    data = lambda r, stage, d: stage_dataset(r, stage, d, teacher=APP, config=DataPlaneConfig(batch_size=4))
    with pytest.raises(TokenizerHashMismatch, match=r"stage 'd2d': the student \(.*init/hf\) uses tokenizer tok-\w+, "
                                                    r"but its rows were annotated by a teacher with tokenizer tok-"):
        run_stages(("d2d",), run, load_recipe(recipe_file), data, TrainOptions(progress=False))
    _nothing_trained(run)


def _replica_running(timeout_s: float = 180) -> None:
    """Wait until Serve has a running replica of the app again (after a kill, it starts a new one)."""
    from teacher_service.app import app_status

    deadline = time.time() + timeout_s
    while (app_status(APP) or {}).get("deployments", {}).get("TeacherDeployment", {}).get("replicas", {}).get("RUNNING") != 1:
        assert time.time() < deadline, f"no running replica of {APP} after {timeout_s}s: {app_status(APP)}"
        time.sleep(0.5)


def _kill_replica_after(answered: int, done: threading.Event, killed: dict, latest: int) -> None:
    """Kill the app's replica (ray.kill: Serve's controller replaces it) once it has answered
    `answered` requests since the stage began, preferably at a moment requests are inside it (waiting
    for their batch or computing), so some calls die with it. A poll goes through Serve and may only
    reach the replica between batches (under load it saw none in flight in CI), so once `latest`
    requests are answered the kill happens anyway: the stage's rows are still being annotated."""
    import ray

    start = _replica_stats()[0]["answered"]
    while not done.is_set():
        stats = _replica_stats()[0]
        n = stats["answered"] - start
        if (n >= answered and stats["in_flight"] > 0) or n >= latest:
            actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"SERVE_REPLICA::{APP}#" in a["name"]]
            ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
            killed.update(pid=stats["pid"], answered=stats["answered"] - start, in_flight=stats["in_flight"])
            return
        time.sleep(0.05)


def test_replica_killed_mid_stage_every_sample_is_distilled_once(teacher_app, base_run, tmp_path):
    from actors.pipeline import DataPlaneConfig, stage_dataset
    from actors.recipe import load_recipe
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.sample_log import effective_steps, read_lines, sample_counts

    recipe_file, base = base_run
    run = _copy(base, tmp_path / "run")
    recipe = load_recipe(recipe_file)
    data = lambda r, stage, d: stage_dataset(r, stage, d, teacher=APP,
                                             config=DataPlaneConfig(batch_size=4, preprocess_actors=(1, 1)))
    done, killed = threading.Event(), {}
    _replica_running()
    threading.Thread(target=_kill_replica_after, args=(12, done, killed, 20), daemon=True).start()
    t0 = time.time()
    try:  # no trainer restart allowed: the teacher's failure must not cost the trainer anything
        summary = run_stages(("d2d",), run, recipe, data, TrainOptions(checkpoint_every=0, max_failures=0,
                                                                       progress=False))["d2d"]
    finally:
        done.set()
    _replica_running()
    after = _replica_stats()
    print(f"\nd2d with the replica killed after {killed.get('answered')} answers, {killed.get('in_flight')} requests "
          f"inside it: {time.time() - t0:.1f}s; its "
          f"replacement answered {after[0]['answered']}; samples {summary['samples']}; teacher calls re-sent "
          f"{json.loads((run / 'stages' / 'd2d' / 'data_stats.json').read_text())['passes'][0]['teacher_retries']}")

    assert killed, "the replica was never killed (the stage finished first?)"
    steps = [r["step"] for r in stage_records(run, "d2d")]
    total = summary["total_steps"]
    assert steps == list(range(1, total + 1))  # every step once: the trainer never restarted
    assert len(after) == 1 and after[0]["pid"] != killed["pid"] and after[0]["answered"] > 0  # the new one served

    # the trainer: every sample of the stage exactly once (the sample log, every rank, every attempt)
    stage_dir = run / "stages" / "d2d"
    stats = json.loads((stage_dir / "data_stats.json").read_text())
    planned = stats["planned_rows"]
    assert planned % 4 == 0 and total == planned // 4  # the recipe's rows fill whole global batches
    counts = sample_counts(effective_steps(read_lines(stage_dir)[0]))
    assert list(counts) == [0] and len(counts[0]) == planned and set(counts[0].values()) == {1}
    assert summary["samples"] == {"rows": planned, "distinct": planned, "repeated_in_epoch": 0, "epochs": 1,
                                  "attempts": 1, "torn_lines": 0}
    # the data plane: every row through preprocessing and annotation, none rejected, none invented
    ops = stats["passes"][0]["ops"]
    assert ops["preprocess"] == {"in": planned, "out": planned, "rejected": 0}
    assert ops["annotate"] == {"in": planned, "out": planned, "rejected": 0}
    assert stats["passes"][0]["teacher_rows"] + stats["passes"][0]["cache_hits"] == planned
    if killed["in_flight"] > 0:  # the killed replica's requests were re-sent, and counted
        assert stats["passes"][0]["teacher_retries"] >= 1
    # the teacher cache: one entry per row the teacher answered, though the killed replica's requests were re-sent
    entries = pq.read_table(sorted((run / "teacher_cache").glob("part-*.parquet")), columns=["content_hash", "id"])
    assert entries.num_rows == stats["passes"][0]["teacher_rows"]
    consumed_bases = {i.split("#")[0] for i in counts[0]}  # copies of a row share its teacher answer
    assert consumed_bases == {i.split("#")[0] for i in entries["id"].to_pylist()}


def test_three_concurrent_student_runs_share_one_bounded_teacher(teacher_app, small_run, tmp_path):
    import psutil

    recipe_file, base = small_run
    _replica_running()
    before = _replica_stats()
    assert len(before) == 1
    replica = psutil.Process(before[0]["pid"])
    rss0 = replica.memory_info().rss
    peak = {"rss": rss0}
    done = threading.Event()

    def sample_rss():
        while not done.is_set():
            peak["rss"] = max(peak["rss"], replica.memory_info().rss)
            time.sleep(0.2)

    threading.Thread(target=sample_rss, daemon=True).start()
    runs = [_copy(base, tmp_path / f"student-{i}") for i in range(3)]
    t0 = time.time()
    procs = [_train(recipe_file, run, teacher_app, "--workers", "1", "--checkpoint-every", "0", "--seed", str(i))
             for i, run in enumerate(runs)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        done.set()
    wall = time.time() - t0
    after = _replica_stats()
    grown = (peak["rss"] - rss0) / 2**20
    print(f"\nthree concurrent runs in {wall:.1f}s; replica RSS {rss0 / 2**20:.0f} MiB -> peak "
          f"{peak['rss'] / 2**20:.0f} MiB (+{grown:.0f}); requests {after[0]['requests'] - before[0]['requests']}, "
          f"answered {after[0]['answered'] - before[0]['answered']}, peak in flight {after[0]['peak_in_flight']} "
          f"(max_ongoing_requests {MAX_ONGOING}, max_queued_requests {MAX_QUEUED} per caller)")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for run in runs:
        assert [r["step"] for r in stage_records(run, "d2d")] == [1, 2, 3]
        summary = json.loads((run / "stages" / "d2d" / "summary.json").read_text())
        assert summary["samples"] == {"rows": 12, "distinct": 12, "repeated_in_epoch": 0, "epochs": 1, "attempts": 1,
                                      "torn_lines": 0}  # every sample of each run exactly once
        assert json.loads((run / "stages" / "d2d" / "run.json").read_text())["status"] == "finished"
    assert after[0]["pid"] == before[0]["pid"]  # the same replica served all three: it never died
    passes = [json.loads((run / "stages" / "d2d" / "data_stats.json").read_text())["passes"][0] for run in runs]
    assert [p["ops"]["annotate"] for p in passes] == [{"in": 12, "out": 12, "rejected": 0}] * 3
    teacher_rows = sum(p["teacher_rows"] for p in passes)
    assert after[0]["answered"] - before[0]["answered"] == teacher_rows == 3 * 12
    assert after[0]["rejected"] == before[0]["rejected"]
    print(f"teacher calls re-sent by the three runs' annotators: {[p['teacher_retries'] for p in passes]}")
    assert after[0]["peak_in_flight"] <= MAX_ONGOING  # Serve's admission bound held inside the replica
    assert grown < RSS_BOUND_MB
