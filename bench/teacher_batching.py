"""Teacher service throughput: dynamic batching vs none, and Serve's overhead vs an in-process forward.

One local Ray, one tiny teacher (random weights, `tiny` preset, 36 image tokens + ~15 text tokens per
request, top-64 at every text position + target log-probs + the answer's sequence log-prob, PNG
images decoded by the service). Three ways to answer the same 32 requests:

  batched    the Serve app as deployed by default: 32 requests in flight at once, `@serve.batch`
             groups them by padded tokens into as few forwards as fit.
  unbatched  the same app with max_batch_tokens = one request's length: one forward per request.
  in_process the backend called directly in this process: decode images, one padded forward of all
             32 (what a trainer holding the teacher itself would do).
  in_process_unbatched  the same, one forward per request: in_process_unbatched / in_process is what
             batching can gain on this hardware at all (the ceiling of the Serve ratio, up to
             Serve's per-request overhead, which batching also amortizes).

Rounds of the three are interleaved so machine noise (2 shared cores) hits them alike; the reported
time is the median round. Prints ONE JSON line; goals: batched/unbatched throughput >= 3, and Serve's
overhead (batched round / in-process round) reported as measured.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_batching.py [--requests 32] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="the app's batch_wait_timeout_s, in ms")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the replicas and of this process")
    a = ap.parse_args()

    import ray
    import torch

    torch.set_num_threads(a.threads)
    from teacher_service.app import ServiceConfig, deploy, shutdown
    from teacher_service.client import TeacherClient
    from teacher_service.protocol import Limits
    from teacher_service.testing import sample_requests, tiny_backend

    tmp = tempfile.TemporaryDirectory(prefix="teacher-bench-")
    model, backend = tiny_backend(Path(tmp.name) / "teacher", threads=a.threads)
    requests = sample_requests(backend.processor, a.requests, top_k=a.top_k)
    longest = max(r.num_tokens for r in requests)
    rows = sum(len(r.positions) + int(r.sequence_mask.sum()) for r in requests)

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}})
    common = dict(model=str(model), device="cpu", dtype="float32", torch_threads=a.threads, num_cpus=a.threads,
                  max_ongoing_requests=64)
    deploy(ServiceConfig(name="bench-batched", batch_wait_timeout_s=a.batch_wait_ms / 1000, **common))
    deploy(ServiceConfig(name="bench-unbatched", max_batch_tokens=longest, limits=Limits(max_tokens=longest), **common))
    clients = {"batched": TeacherClient("bench-batched"), "unbatched": TeacherClient("bench-unbatched")}

    def in_process() -> None:
        backend.score([backend.prepare(r, Limits()) for r in requests])

    def in_process_unbatched() -> None:
        for r in requests:
            backend.score([backend.prepare(r, Limits())])

    runs = {"batched": lambda: clients["batched"].score_many(requests),
            "unbatched": lambda: clients["unbatched"].score_many(requests),
            "in_process": in_process,
            "in_process_unbatched": in_process_unbatched}
    times: dict[str, list[float]] = {k: [] for k in runs}
    before: dict = {}
    for it in range(a.warmup + a.rounds):
        if it == a.warmup:
            before = {k: c.server_stats() for k, c in clients.items()}
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if it >= a.warmup:
                times[key].append(time.perf_counter() - t0)
    stats = {k: c.server_stats() for k, c in clients.items()}
    # Seconds per measured round the replica spent in backend.score (the forwards), the rest is Serve's.
    replica_fwd = {k: (stats[k]["forward_s"] - before[k]["forward_s"]) / a.rounds for k in clients}
    for name in ("bench-batched", "bench-unbatched"):
        shutdown(name)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    mean_batch = {k: round(s["answered"] / max(s["batches"], 1), 1) for k, s in stats.items()}
    print(json.dumps({
        "bench": "teacher_batching",
        "concurrent_requests": a.requests,
        "tokens_per_request": round(sum(r.num_tokens for r in requests) / len(requests), 1),
        "rows_per_round": rows,
        "top_k": a.top_k,
        "rounds": a.rounds,
        "torch_threads": a.threads,
        "batch_wait_ms": a.batch_wait_ms,
        "batched_round_s": round(med["batched"], 4),
        "unbatched_round_s": round(med["unbatched"], 4),
        "in_process_round_s": round(med["in_process"], 4),
        "in_process_unbatched_round_s": round(med["in_process_unbatched"], 4),
        "mean_requests_per_forward": mean_batch,
        "throughput_ratio_batched_vs_unbatched": round(med["unbatched"] / med["batched"], 2),
        "batching_ceiling_in_process": round(med["in_process_unbatched"] / med["in_process"], 2),
        "serve_overhead_ratio_batched_vs_in_process": round(med["batched"] / med["in_process"], 2),
        "serve_overhead_ms_per_round": round((med["batched"] - med["in_process"]) * 1e3, 1),
        # where a round's time goes: the replica's forwards vs everything else (routing, queueing,
        # validation, image decoding, (de)serialization), for both apps
        "replica_forward_s_per_round": {k: round(v, 4) for k, v in replica_fwd.items()},
        "serve_rest_ms_per_request": {k: round((med[k] - replica_fwd[k]) / a.requests * 1e3, 2) for k in clients},
        "forward_ratio_unbatched_vs_batched": round(replica_fwd["unbatched"] / max(replica_fwd["batched"], 1e-9), 2),
        "goal_throughput_ratio": 3.0,
    }))


if __name__ == "__main__":
    main()
