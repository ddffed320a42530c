"""P2 accuracy: a student distilled from the teacher's top-64 vs from its full-vocab distribution.

In process, plain torch, one thread, the project's own pieces: a generated shapes world (rows by
the data plane's functions, bench/_shapes.py), the `tiny` teacher with its vision tower pretrained on
per-cell labels (student.vision_pretrain) and then trained like the recipe's teacher stage (CE on the
world's multi-turn chats, its batch size and learning rate, student.training.step.stage_step), and
two students from the same seed (fresh `tiny` LLM + the
teacher's tower, d2d trainable set) trained on the same batches in the same order with the same
optimizer, differing only in the teacher signal of `student.losses.kd_loss` (forward KL at the
response positions, LLaVA-MoD's mimic distillation without CE):

  full  FullTeacher: fp32 log-probs over the whole vocab;
  topk  TopKTeacher: what the teacher service ships (`teacher_service.scoring.score_rows`: top-64
        ids, fp16 log-probs, fp32 tail mass), from the same teacher forward.

Both are scored by `student.eval.evaluate` (greedy decoding) on the world's test split: VQA
accuracy, POPE accuracy, caption exact match and their record-weighted mean ("accuracy").
Goal: |topk - full| <= 1 point. The shapes vocab is small (V = 413 with k = 64), so the JSON also
reports the teacher's mean tail mass outside its top-64 at the distilled positions: the less mass
the tail holds, the less top-k can lose.

    OMP_NUM_THREADS=1 .venv/bin/python bench/topk_vs_full_kd.py [--world-size 400] [--teacher-steps 300] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shapes  # noqa: E402  (sets OMP env and the repo path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=400, help="images of the generated world")
    ap.add_argument("--vision-steps", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=200, help="student steps (each arm)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=400, help="test records per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(1)
    from actors import columns as C
    from actors.recipe import LossSpec, load_recipe
    from actors.shapes.tokenizer import load_tokenizer
    from student.eval.data import load_split
    from student.eval.evaluate import evaluate
    from student.losses import FullTeacher, TopKTeacher, kd_loss, select_mask
    from student.model import apply_trainable, build_processor, build_student, build_teacher, get_preset
    from student.model.builder import copy_vision_tower
    from student.training.step import StepContext, forward_hidden, stage_step
    from student.vision_pretrain import VisionPretrainConfig, pretrain_vision_tower
    from teacher_service.scoring import score_rows

    t_start = time.perf_counter()
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml")
    tmp = tempfile.TemporaryDirectory(prefix="topk-vs-full-")
    world = _shapes.make_world(Path(tmp.name) / "world", a.world_size, seed=a.seed)
    tok = load_tokenizer(world / "tokenizer")
    preset = get_preset("tiny")
    processor = build_processor(tok, preset.vision.image_size, preset.vision.patch_size)
    vocab = len(tok)
    ctx = StepContext(vocab_size=vocab, image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
    rows = _shapes.world_rows(world, processor)  # the d2d stage's tasks: caption, vqa, pope
    chats = _shapes.world_rows(world, processor, tasks=("chat",))  # the teacher stage's multi-turn chats

    def batches(pool: list[dict], n_steps: int, size: int, seed: int):
        """n_steps batches of `size` rows: epochs of `pool` in one seeded order (same for both arms)."""
        order = np.concatenate([np.random.default_rng(seed + e).permutation(len(pool))
                                for e in range(n_steps * size // len(pool) + 1)])
        for s in range(n_steps):
            yield [pool[i] for i in order[s * size:(s + 1) * size]]

    # 1. The teacher: vision tower on per-cell labels, then CE on the world's answers.
    teacher = build_teacher(preset, tok, seed=a.seed)
    cols = ["image_id", "image", "cell_present", "cell_shape", "cell_colour", "cell_size"]
    images = list({r["image_id"]: r for r in pq.read_table(world / "train", columns=cols).to_pylist()}.values())
    ip = processor.image_processor
    pretrain_vision_tower(teacher.model.vision_tower, images, image_mean=ip.image_mean, image_std=ip.image_std,
                          cfg=VisionPretrainConfig(steps=a.vision_steps, seed=a.seed), progress=False)
    spec = recipe.stages["teacher"]
    teacher.train()
    apply_trainable(teacher, "teacher")
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=spec.optim.lr)
    t0 = time.perf_counter()
    for batch_rows in batches(chats, a.teacher_steps, spec.batch_size, a.seed + 1):
        loss, _ = stage_step(teacher, _shapes.collate(batch_rows, ctx.pad_token_id), "teacher", LossSpec(ce=1.0), ctx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    teacher_train_s = time.perf_counter() - t0
    teacher.eval().requires_grad_(False)

    # 2. The teacher's distributions at every row's response positions, once: full fp32 and the wire's top-k.
    full_lp, topk, tail_mass = {}, {}, []
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            b = _shapes.collate(chunk, ctx.pad_token_id)
            hidden = forward_hidden(teacher, b[C.INPUT_IDS], b[C.ATTENTION_MASK], b[C.PIXEL_VALUES])
            resp = select_mask("response", labels=b[C.LABELS], attention_mask=b[C.ATTENTION_MASK])
            for j, r in enumerate(chunk):
                x = hidden[j][resp[j]]
                logits = teacher.lm_head(x)[:, :vocab].float()
                full_lp[r[C.ID]] = torch.log_softmax(logits, dim=-1)
                s = score_rows(x, teacher.lm_head, vocab_size=vocab, top_k=a.top_k)
                topk[r[C.ID]] = (torch.tensor(s.topk_ids), torch.tensor(s.topk_logprobs), torch.tensor(s.tail_logmass))
                tail_mass.append(np.exp(s.tail_logmass.astype(np.float64)))
    tail = np.concatenate(tail_mass)

    # 3. Two students, identical but for the teacher signal.
    test, _ = load_split(world, "test", limit=a.eval_limit)
    spec = recipe.stages["d2d"]

    def distil(arm: str) -> tuple[dict, float]:
        torch.manual_seed(a.seed)
        student = build_student(preset, tok, seed=a.seed)
        copy_vision_tower(teacher, student)
        student.train()
        apply_trainable(student, "d2d")
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=spec.optim.lr)
        t0 = time.perf_counter()
        for batch_rows in batches(rows, a.steps, a.batch_size, a.seed + 2):
            b = _shapes.collate(batch_rows, ctx.pad_token_id)
            hidden = forward_hidden(student, b[C.INPUT_IDS], b[C.ATTENTION_MASK], b[C.PIXEL_VALUES])
            resp = select_mask("response", labels=b[C.LABELS], attention_mask=b[C.ATTENTION_MASK])
            ids = [r[C.ID] for r in batch_rows]
            if arm == "full":
                t = FullTeacher(torch.cat([full_lp[i] for i in ids]))
            else:
                t = TopKTeacher(*(torch.cat([topk[i][n] for i in ids]) for n in range(3)))
            loss = kd_loss(hidden[resp], t, lm_head_weight=student.lm_head.weight, lm_head_bias=student.lm_head.bias,
                           kind=spec.loss.kd_kind, temperature=spec.loss.temperature, vocab_size=vocab)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        student.eval()
        return evaluate(student, processor, test, progress=False, return_predictions=True), train_s

    def score(res: dict) -> dict:
        s, n = res["summary"], res["counts"]
        parts = [("vqa", s["vqa_accuracy"]), ("pope", s["pope_accuracy"]), ("caption", s["caption_exact_match"])]
        total = sum(n.get(k, 0) for k, v in parts if v is not None)
        acc = sum(v * n.get(k, 0) for k, v in parts if v is not None) / max(total, 1)
        return {"accuracy": round(100 * acc, 2), "vqa_accuracy": round(100 * s["vqa_accuracy"], 2),
                "pope_accuracy": round(100 * s["pope_accuracy"], 2),
                "caption_exact_match": round(100 * s["caption_exact_match"], 2)}

    results, seconds = {}, {}
    for arm in ("full", "topk"):
        results[arm], seconds[arm] = distil(arm)
    teacher_res = evaluate(teacher, processor, test, progress=False)
    same = np.mean([p["prediction"] == q["prediction"] for p, q in
                    zip(results["full"]["predictions"], results["topk"]["predictions"])])
    full, top = score(results["full"]), score(results["topk"])
    print(json.dumps({
        "bench": "topk_vs_full_kd",
        "training": "in-process plain torch, 1 thread, student.losses.kd_loss (forward KL, response positions)",
        "preset": "tiny",
        "world_images": a.world_size,
        "train_rows": len(rows),
        "teacher_chat_rows": len(chats),
        "test_records": len(test),
        "vocab_size": vocab,
        "top_k": a.top_k,
        "teacher_tail_mass_mean": float(tail.mean()),
        "teacher_tail_mass_p99": float(np.quantile(tail, 0.99)),
        "teacher_tail_mass_max": float(tail.max()),
        "teacher_steps": a.teacher_steps,
        "student_steps": a.steps,
        "batch_size": a.batch_size,
        "seed": a.seed,
        "teacher": score(teacher_res),
        "full_vocab_kd": full,
        "topk_kd": top,
        "accuracy_gap_points": round(top["accuracy"] - full["accuracy"], 2),
        "same_prediction_fraction": round(float(same), 4),
        "goal_gap_points": 1.0,
        "goal_met": abs(top["accuracy"] - full["accuracy"]) <= 1.0,
        "teacher_train_s": round(teacher_train_s, 1),
        "student_train_s": {k: round(v, 1) for k, v in seconds.items()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }))


if __name__ == "__main__":
    main()
