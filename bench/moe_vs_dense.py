"""Training-step cost of the upcycled MoE student (E4T2, grouped_mm) relative to its dense parent, on CPU.

For each preset the dense student and its upcycled twins (experts on every other layer, the LLaVA-MoD
layout and `upcycle`'s default, and on all layers) run the same step: forward on a batch of 8 x 128
tokens (36 of them image tokens from 48x48 images), CE on the text positions (+ 0.01 x the router
load-balancing loss for the MoE, collected by `RouterRecorder`, as training will), backward. The
projector and the LLM are trainable, the vision tower frozen (as in d2d/sft), for all variants.

Variants are interleaved iteration by iteration so machine noise (2 shared cores) hits them alike;
the reported time is the median after warm-up. Prints ONE JSON line; the goal is ratio <= 1.5.

    .venv/bin/python bench/moe_vs_dense.py [--presets tiny small] [--iters 7] [--threads 2]

Top-2 of 4 experts the size of the dense FFN doubles the FFN FLOPs of each MoE layer, so the ideal
ratio is about 1 + (FFN share of the step) for all layers and half that excess for every other layer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: spinning worker threads on cores shared with other processes turn
# contention into 10x slowdowns of every op (measured here: 8.5 s vs 0.6 s per step), i.e. noise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_batch(tok, batch: int, seq: int, image_tokens: int, torch):
    g = torch.Generator().manual_seed(0)
    special = set(tok.all_special_ids)
    text_ids = torch.tensor([i for i in range(len(tok)) if i not in special])
    ids = text_ids[torch.randint(len(text_ids), (batch, seq), generator=g)]
    ids[:, 0] = tok.convert_tokens_to_ids("<|user|>")
    ids[:, 1 : 1 + image_tokens] = tok.image_token_id
    labels = ids.masked_fill(ids == tok.image_token_id, -100)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 48, 48, generator=g),
        "labels": labels,
    }


def step_fn(model, batch, aux_coef: float):
    from student.model import RouterRecorder

    recorder = RouterRecorder(model)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with recorder:
            loss = model(**batch).loss
            if recorder.has_routers:
                loss = loss + aux_coef * recorder.stats(batch["attention_mask"]).aux_loss
        loss.backward()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from actors.shapes.tokenizer import build_tokenizer
    from student.model import apply_trainable, build_student, get_preset, upcycle

    tok = build_tokenizer()
    result = {
        "bench": "moe_vs_dense",
        "batch": a.batch,
        "seq": a.seq,
        "image_tokens": 36,
        "experts": a.experts,
        "top_k": a.top_k,
        "experts_implementation": "grouped_mm",
        "threads": a.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "iters": a.iters,
        "torch": torch.__version__,
    }
    for name in a.presets:
        preset = get_preset(name)
        dense = build_student(preset, tok).train()
        variants = {
            "dense": dense,
            "moe_every_other": upcycle(dense, a.experts, a.top_k, layers="every_other").train(),
            "moe_all": upcycle(dense, a.experts, a.top_k, layers="all").train(),
        }
        batch = make_batch(tok, a.batch, a.seq, preset.vision.num_patches, torch)
        steps = {}
        for key, model in variants.items():
            apply_trainable(model, "sft")
            steps[key] = step_fn(model, batch, aux_coef=0.01)
        times = {k: [] for k in variants}
        for it in range(a.warmup + a.iters):
            for key, step in steps.items():
                t = step()
                if it >= a.warmup:
                    times[key].append(t)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        result[name] = {
            "dense_ms": round(ms["dense"], 1),
            "moe_every_other_ms": round(ms["moe_every_other"], 1),
            "moe_all_ms": round(ms["moe_all"], 1),
            "ratio_every_other": round(ms["moe_every_other"] / ms["dense"], 3),
            "ratio_all": round(ms["moe_all"] / ms["dense"], 3),
        }
    result["goal"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
