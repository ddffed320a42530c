"""P1: what serving the teacher costs a training step (issue #9).

Set-up: the `small` preset (teacher LM 8 x H512, MoE student 6 x H256 upcycled E4T2 on every other
layer), rows of a generated shapes world made by the data plane's own functions (bench/_shapes.py),
the d2s objective of datasets/shapes.yaml (KL at response positions to the teacher's top-64 + CE +
0.01 aux) at its batch size (32). The student step is plain torch in this process: `stage_step`
forward, backward, AdamW step (no DeepSpeed, no Ray Train: their overheads are per stage, not per
step, docs/training.md). One torch thread for the student and one for the teacher.

(a) serve_roundtrip_vs_step: one `TeacherClient.score_many` call carrying one batch's requests (32
    rows, pixel_values + positions, as the annotator sends them) to a Serve app whose backend is
    `noop` (teacher_service.testing.NoopBackend: correctly shaped top-64 answers, no forward), i.e.
    validation, batching, handle routing and the object store both ways; divided by the student step.
    Goal <= 0.10.
(b) serve_prefetch_vs_in_worker: the step time of a loop that takes each batch's teacher answers from
    the real small teacher on Serve, requested one batch ahead (a background thread runs the next
    batch's score_many while this batch trains: what the streaming annotator does for the trainer),
    divided by the step time of the same loop with the teacher's forward in this process before each
    step (hf backend, same scoring code). Goal <= 1.05 when the teacher has its own cores or device.
    Here teacher and student share the machine's cores ("shared_cores") with each other, with Ray
    and with whatever else runs (load average reported): contention, not the service, dominates.

Modes alternate in rounds of a few steps so machine noise hits them alike; medians are reported.
Prints ONE JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_cost.py [--preset small] [--rounds 3] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets OMP env and the repo path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stage", default="d2s", help="the recipe stage whose objective and batch size the step uses")
    ap.add_argument("--world-size", type=int, default=60, help="images of the generated world")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    ap.add_argument("--roundtrips", type=int, default=15, help="no-op round trips measured for (a)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import ray
    import torch

    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    from actors.annotate import annotation_plan
    from actors.cache import CacheKey
    from actors.recipe import load_recipe
    from student.model import RouterRecorder, apply_trainable, build_student, get_preset, upcycle
    from student.training.step import StepContext, stage_step
    from teacher_service.app import ServiceConfig, deploy, shutdown
    from teacher_service.client import TeacherClient
    from teacher_service.protocol import Limits
    from teacher_service.testing import tiny_backend

    load_at_start = os.getloadavg()
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml")
    spec = recipe.stages[a.stage]
    tmp = tempfile.TemporaryDirectory(prefix="serve-cost-")
    root = Path(tmp.name)
    teacher_dir, backend = tiny_backend(root / "teacher", preset=a.preset, threads=1, seed=a.seed)
    processor = backend.processor
    tok = processor.tokenizer
    world = _shapes.make_world(root / "world", a.world_size, seed=a.seed)
    n_batches = a.steps + 1
    rows = _shapes.world_rows(world, processor, limit=spec.batch_size * n_batches)
    if len(rows) < spec.batch_size * n_batches:
        raise SystemExit(f"the world has {len(rows)} train rows, {spec.batch_size * n_batches} needed: raise --world-size")
    batches = [rows[i * spec.batch_size:(i + 1) * spec.batch_size] for i in range(n_batches)]
    plan = annotation_plan(a.stage, spec.loss, top_k=a.top_k)
    key = CacheKey(backend.info.model_id, backend.info.tokenizer_hash, a.top_k)
    requests = [_shapes.batch_requests(b, plan, tok.image_token_id) for b in batches]

    preset = get_preset(a.preset)
    model = build_student(preset, tok, seed=a.seed)
    if a.stage in ("d2s", "preference", "dpt", "dft"):
        model = upcycle(model, recipe.model.num_experts, recipe.model.top_k, layers=recipe.model.moe_layers, seed=a.seed)
    model.train()
    apply_trainable(model, a.stage)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optim.lr)
    recorder = RouterRecorder(model)
    ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=backend.info.pad_token_id)

    def train_step(batch_rows, responses, reqs) -> None:
        batch = _shapes.collate(_shapes.with_teacher(batch_rows, reqs, responses, plan, key), ctx.pad_token_id)
        with recorder:
            loss, _ = stage_step(model, batch, a.stage, spec.loss, ctx, recorder)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_in_process(reqs):
        return backend.score([backend.prepare(r, Limits()) for r in reqs])

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}})
    common = dict(model=str(teacher_dir), device="cpu", dtype="float32", torch_threads=1, num_cpus=1)
    deploy(ServiceConfig(name="bench-noop", backend="noop", **common))
    deploy(ServiceConfig(name="bench-teacher", **common))
    noop, served = TeacherClient("bench-noop"), TeacherClient("bench-teacher")

    def loop_in_worker() -> list[float]:
        times = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            train_step(batches[i], teacher_in_process(requests[i]), requests[i])
            times.append(time.perf_counter() - t0)
        return times

    pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-prefetch")

    def loop_served() -> list[float]:
        times = []
        ahead = pool.submit(served.score_many, requests[0])  # the pipeline fills before the first step
        ahead.result()
        ahead = pool.submit(served.score_many, requests[0])
        for i in range(a.steps):
            t0 = time.perf_counter()
            responses = ahead.result()
            ahead = pool.submit(served.score_many, requests[i + 1])  # the next batch while this one trains
            train_step(batches[i], responses, requests[i])
            times.append(time.perf_counter() - t0)
        ahead.result()
        return times

    # Warm-up: first steps (allocator, optimizer state), first Serve calls.
    noop.score_many(requests[0])
    loop_in_worker()
    loop_served()
    # (a) no-op round trips alternating with pure student steps on a fixed batch's answers.
    fixed = teacher_in_process(requests[0])
    rt, step = [], []
    for _ in range(a.roundtrips):
        t0 = time.perf_counter()
        answers = noop.score_many(requests[0])
        rt.append(time.perf_counter() - t0)
        assert len(answers) == len(requests[0]) and answers[0].topk_ids.shape[1] == a.top_k
    for _ in range(max(3, a.steps)):
        t0 = time.perf_counter()
        train_step(batches[0], fixed, requests[0])
        step.append(time.perf_counter() - t0)
    # Teacher forward alone, in process (what the in-worker loop adds to each step).
    fwd = []
    for i in range(3):
        t0 = time.perf_counter()
        teacher_in_process(requests[i])
        fwd.append(time.perf_counter() - t0)
    # (b) rounds alternating the two loops.
    times = {"in_worker": [], "served_prefetch": []}
    for _ in range(a.rounds):
        times["in_worker"] += loop_in_worker()
        times["served_prefetch"] += loop_served()
    server = served.server_stats()
    for name in ("bench-noop", "bench-teacher"):
        shutdown(name)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    step_s, rt_s = statistics.median(step), statistics.median(rt)
    positions = sum(len(r.positions) for r in requests[0])
    cores = os.cpu_count() or 1
    print(json.dumps({
        "bench": "serve_cost",
        "preset": a.preset,
        "stage": a.stage,
        "batch_size": spec.batch_size,
        "top_k": a.top_k,
        "positions_per_batch": positions,
        "tokens_per_batch": int(sum(len(r.input_ids) for r in requests[0])),
        "student_step": "plain torch fwd+bwd+AdamW, 1 thread, MoE student" if a.stage in ("d2s", "preference", "dpt", "dft") else "plain torch fwd+bwd+AdamW, 1 thread, dense student",
        "student_step_s": round(step_s, 4),
        "noop_roundtrip_s": round(rt_s, 4),
        "noop_roundtrip_p90_s": round(sorted(rt)[int(0.9 * (len(rt) - 1))], 4),
        "serve_roundtrip_vs_step": round(rt_s / step_s, 4),
        "goal_roundtrip_vs_step": 0.10,
        "teacher_forward_in_process_s": round(statistics.median(fwd), 4),
        "step_in_worker_s": round(med["in_worker"], 4),
        "step_served_prefetch_s": round(med["served_prefetch"], 4),
        "serve_prefetch_vs_in_worker": round(med["served_prefetch"] / med["in_worker"], 3),
        "goal_prefetch_vs_in_worker": 1.05,
        "steps_per_mode": len(times["in_worker"]),
        "replica_forward_s_per_batch": round(server["forward_s"] * spec.batch_size / max(server["answered"], 1), 4),
        "cpu_cores": cores,
        "shared_cores": cores <= 2,
        "load_average_at_start": [round(x, 2) for x in load_at_start],
    }))


if __name__ == "__main__":
    main()
