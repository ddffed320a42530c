"""Bytes on the wire per scored token: what the teacher ships back for top-k distillation.

Real responses of the tiny teacher (hf backend, in process) for chat requests with top-k at every
text position, measured with Ray's own serializer, i.e. the bytes a replica hands the object store
for a handle: one response alone (`TeacherClient.score`) and the list of a `score_many` call (one
serialized object per chunk of requests, framing shared); and as the npz body of the HTTP ingress.
Per scored token = per requested position. Three workloads: top-k at the text positions
after the image of answers 4x the shapes world's (LLaVA-MoD's response KD, ~28 positions), at the
image + text positions (LLaVA-KD's MDist, ~63) and at the text positions of the world's own short
answers (~13; the goal is judged at ~28 and ~63). Variants: top-k only, and top-k + target log-probs + the sequence log-prob (KD + DPO). The request
side (ids, positions, one PNG image) is reported too. Goal: <= 400 B per scored token at k = 64.

Per row the arrays cost k * (4 B int32 id + 2 B fp16 log-prob) + 4 B fp32 tail (+ 4 B fp32 target):
388 (392) B at k = 64; the rest is per-response framing (Ray's object header, the pickled identity
strings and the packed layout: protocol 2 ships all arrays of a response as one payload), amortized
over the request's positions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_wire_bytes.py [--top-k 64] [--requests 16]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--repeat-answer", type=int, default=4, help="longer answers: more positions per request")
    a = ap.parse_args()

    import numpy as np
    import ray
    import torch

    torch.set_num_threads(1)
    from teacher_service.protocol import PROTOCOL_VERSION, Limits, encode_request, encode_response
    from teacher_service.testing import sample_requests, tiny_backend

    tmp = tempfile.TemporaryDirectory(prefix="teacher-bench-")
    _, backend = tiny_backend(Path(tmp.name) / "teacher")
    text = sample_requests(backend.processor, a.requests, top_k=a.top_k, repeat_answer=a.repeat_answer)
    # LLaVA-KD's MDist scores the image-token positions too: every position from the first image token on.
    first_image = [int(np.flatnonzero(r.input_ids == backend.info.image_token_id).min()) for r in text]
    mdist = [dataclasses.replace(r, positions=np.arange(f, r.num_tokens - 1, dtype=np.int32),
                                 target_ids=r.input_ids[f + 1:]) for r, f in zip(text, first_image)]
    short = sample_requests(backend.processor, a.requests, top_k=a.top_k)  # the shapes world's one-line answers
    workloads = {"response_positions": text, "mdist_positions": mdist, "short_answers": short}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ser = ray._private.worker.global_worker.get_serialization_context()

    row = a.top_k * 6 + 4  # int32 id + fp16 log-prob per entry, fp32 tail
    result = {"bench": "teacher_wire_bytes", "protocol_version": PROTOCOL_VERSION, "top_k": a.top_k,
              "requests": a.requests, "vocab_size": backend.info.vocab_size, "array_bytes_per_row_topk": row}
    for wname, full in workloads.items():
        positions = sum(len(r.positions) for r in full)
        res = {"positions_per_request": round(positions / a.requests, 1)}
        variants = {"topk_only": [dataclasses.replace(r, target_ids=None, sequence_mask=None) for r in full],
                    "topk_targets_sequence": full}
        for name, reqs in variants.items():
            resps = backend.score([backend.prepare(r, Limits()) for r in reqs])
            ray_bytes = sum(ser.serialize(x).total_bytes for x in resps)
            res[name] = {
                "ray_bytes_per_token": round(ray_bytes / positions, 1),
                "ray_list_call_bytes_per_token": round(ser.serialize(resps).total_bytes / positions, 1),
                "npz_http_bytes_per_token": round(sum(len(encode_response(x)) for x in resps) / positions, 1),
            }
            if name == "topk_only":
                res["ray_framing_bytes_per_response"] = round((ray_bytes - positions * row) / a.requests, 1)
        res["request_ray_bytes_per_token"] = round(sum(ser.serialize(r).total_bytes for r in full) / positions, 1)
        res["request_npz_bytes_per_token"] = round(sum(len(encode_request(r)) for r in full) / positions, 1)
        result[wname] = res
    result["goal_bytes_per_token"] = 400
    result["goal_met"] = all(result[w][v]["ray_bytes_per_token"] <= 400 for w in ("response_positions", "mdist_positions")
                             for v in ("topk_only", "topk_targets_sequence"))
    ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
