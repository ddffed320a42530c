"""Does preprocessing keep up with training? Rows/s of the data plane's preprocessing vs the tiny
student's training step, one thread each, measured in the same run.

Preprocessing is exactly what one actor of the Ray Data pool runs (`actors.preprocess.Preprocessor
.process`: decode + resize the image with the model's processor, chat template, tokenization with
offsets, image-token expansion, labels and masks) on the rows of the recipe's d2s stage (the
world's multi-turn chats, one per image, ~270 tokens each). Training is the dense tiny student's forward + backward +
AdamW step on the same rows padded per batch (`pad_collate`), CE on the response (the cheapest
real stage: a sparse student or a KD loss only makes training slower, so the ratio only grows).

Rounds alternate between the two so noise from other processes on the shared cores hits both alike;
each reports the median over rounds. Prints ONE JSON line; the goal is ratio >= 2 (one preprocessing
actor feeds at least two training workers' worth of rows).

    .venv/bin/python bench/preprocess_vs_train.py [--rows 128] [--batch-size 16] [--rounds 5]
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="rows preprocessed per round")
    ap.add_argument("--batch-size", type=int, default=16, help="the d2s stage's batch in datasets/shapes.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=200, help="images in the generated shapes world")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from actors.collate import pad_collate
    from actors.mixing import mix_sources
    from actors.preprocess import PreprocessConfig, Preprocessor, ProcessorSpec
    from actors.recipe import load_recipe
    from actors.shapes.generate import GenerateConfig, generate_world
    from actors.sources import load_source
    from student.model import build_student, get_preset

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(world, GenerateConfig(size=args.world_size, seed=args.seed), progress=False)
        stage = recipe.stages["d2s"]
        tables = {s.name: load_source(s, {"world": str(world)}) for s in stage.sources}
        mixed, _, _ = mix_sources(tables, {s.name: s.weight for s in stage.sources}, args.seed)
        records = mixed.to_pylist()
        if len(records) < args.rows:
            raise SystemExit(f"the world has {len(records)} rows for this stage; raise --world-size")
        vision = get_preset(recipe.model.preset).vision
        spec = ProcessorSpec(tokenizer=str(world / "tokenizer"), image_size=vision.image_size, patch_size=vision.patch_size)
        pre = Preprocessor(PreprocessConfig(spec))  # the actor's code, in this process
        rows, rejects = pre.process(records)
        if rejects:
            raise SystemExit(f"unexpected rejects in the shapes world: {rejects[:3]}")

        model = build_student(get_preset(recipe.model.preset), pre.processor.tokenizer, seed=args.seed)
        model.train()
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        pad_id = pre.processor.tokenizer.pad_token_id
        keys = list(rows[0])
        batches = [pad_collate({k: [r[k] for r in rows[i : i + args.batch_size]] for k in keys}, pad_id)
                   for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]

        def train_step(b) -> None:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                        labels=b["labels"])
            out.loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        train_step(batches[0])  # warm-up (allocator, AdamW state)
        pre.process(records[: args.batch_size])
        pre_rates, train_rates = [], []
        for r in range(args.rounds):
            start = (r * args.rows) % max(1, len(records) - args.rows + 1)
            t0 = time.perf_counter()
            pre.process(records[start : start + args.rows])
            pre_rates.append(args.rows / (time.perf_counter() - t0))
            n, t0 = 0, time.perf_counter()
            while n < args.rows:
                b = batches[(n // args.batch_size + r) % len(batches)]
                train_step(b)
                n += b["input_ids"].shape[0]
            train_rates.append(n / (time.perf_counter() - t0))

    pre_rate, train_rate = statistics.median(pre_rates), statistics.median(train_rates)
    print(json.dumps({
        "bench": "preprocess_vs_train",
        "preset": recipe.model.preset,
        "stage_mix": "d2s",
        "rows_per_round": args.rows,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "threads": 1,
        "mean_tokens_per_row": round(sum(len(r["input_ids"]) for r in rows) / len(rows), 1),
        "preprocess_rows_per_s": round(pre_rate, 1),
        "train_rows_per_s": round(train_rate, 1),
        "ratio": round(pre_rate / train_rate, 2),
        "goal": 2.0,
        "meets_goal": pre_rate / train_rate >= 2.0,
    }))


if __name__ == "__main__":
    main()
