"""Probe: how well a teacher LM reads the shapes world after N steps, per question type and object count.

The measurements behind docs/training.md "Where the position gets lost": the teacher stage's model
classes, tower pretraining and chats, in one process without Ray (minutes, not the demo's ten), with
switches for the variants the table compares. Opt-in in run_all (a research probe, not a ratio):

    .venv/bin/python bench/teacher_position_probe.py [--steps 600] [--seed 0] [--world DIR]
        [--feature-layers 0,-1] [--position-init-std 0.3] [--position-code-scale 1.0]
        [--layout words --patch-size 16] [--layers 3] [--length-window 8] [--weight-decay 0.1]
        [--heads 8] [--head-dim 64] [--rope-theta 1e6] [--qk-norm-lr 30] [--vision-layers 1]
        [--ground-weight 0.5 [--ground-questions]]

Prints one JSON line: exact-match accuracy (%) of the teacher-forced answer per task type
(caption, pope, and each VQA kind), and per object count for the VQA kinds ("position@2" ...).
`--position-code-scale` is the diagnostic hook (a learned vector per image token added to the
projector's output): not a standard HF module, so never used by the stage. One run swings by 15-30
points on the position questions: compare variants over several seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402



def with_cell_names(row: dict, names: list[list[int]], image_token_id: int) -> dict:
    """A data-plane row with each image token preceded by its cell's name (one image token per cell);
    the probe reads ids, labels, attention and pixels only, so the other masks are dropped."""
    from actors import columns as C

    ids, labels, cell = [], [], 0
    for i, l in zip(row[C.INPUT_IDS].tolist(), row[C.LABELS].tolist()):
        if i == image_token_id:
            ids += names[cell]
            labels += [C.IGNORE_INDEX] * len(names[cell])
            cell += 1
        ids.append(i)
        labels.append(l)
    return {C.ID: row[C.ID], C.TASK: row[C.TASK], C.SUBTASK: row[C.SUBTASK], C.PIXEL_VALUES: row[C.PIXEL_VALUES],
            C.INPUT_IDS: np.asarray(ids, np.int32), C.LABELS: np.asarray(labels, np.int32),
            C.ATTENTION_MASK: np.ones(len(ids), np.int8)}


def word_kind(word: str) -> str:
    """Which attribute a caption word names: where a wrong caption first goes wrong."""
    from actors.shapes.tasks import NUMBER_WORDS
    from actors.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, SIZES

    word = word.lstrip("Ġ▁ ")  # byte-level BPE's space marker
    places = {w for p in POSITIONS for w in p.split()}
    for kind, words in (("count", NUMBER_WORDS), ("colour", COLOUR_NAMES), ("shape", SHAPES), ("size", SIZES),
                        ("position", places)):
        if word in words:
            return kind
    return "other:" + word


def qk_gain(model) -> list[float]:
    """Per LM layer, the mean of q_norm x k_norm gains: how much sharper than at init its attention may be."""
    layers = model.model.language_model.layers
    return [round(float((l.self_attn.q_norm.weight.abs().mean() * l.self_attn.k_norm.weight.abs().mean())), 2)
            for l in layers if hasattr(l.self_attn, "q_norm")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=None, help="a generated shapes world (default: generate 3000 images)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset's)")
    ap.add_argument("--rope-theta", type=float, default=None, help="the LM's RoPE base (default: the preset's)")
    ap.add_argument("--head-dim", type=int, default=None, help="per-head width (default: the preset's)")
    ap.add_argument("--qk-norm-lr", type=float, default=1.0,
                    help="learning-rate multiplier of the q_norm/k_norm gains (how fast attention may sharpen)")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--vision-layers", type=int, default=None, help="vision tower layers (default: the preset's)")
    ap.add_argument("--feature-layers", default="-1", help="vision_feature_layer: -1, or a list such as 0,-1")
    ap.add_argument("--position-init-std", type=float, default=None, help="re-initialise CLIP's position table")
    ap.add_argument("--position-code-scale", type=float, default=0.0, help="diagnostic hook; 0 = off")
    ap.add_argument("--position-dims", type=int, default=0, help="tower pretraining: features given to a position code")
    ap.add_argument("--position-scale", type=float, default=1.0, help="the position code's scale")
    ap.add_argument("--position-weight", type=float, default=1.0, help="the position code's loss weight")
    ap.add_argument("--layout", choices=("plain", "words"), default="plain")
    ap.add_argument("--eval-records", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length-window", type=int, default=1,
                    help="group every N sampled batches by row length, as the workers do (1: random batches)")
    ap.add_argument("--ground-weight", type=float, default=0.0,
                    help="the teacher stage's grounding loss (student.losses.grounding) at this weight; 0 = off")
    ap.add_argument("--ground-questions", action="store_true",
                    help="with --ground-weight: also ground colour / size / shape-at / POPE answers on the cells "
                         "the image's labels give (actors.shapes.grounding.question_cells)")
    ap.add_argument("--eval-every", type=int, default=0, help="also print the accuracy every N steps (0: at the end only)")
    a = ap.parse_args()

    import pyarrow.parquet as pq
    from transformers import LlavaForConditionalGeneration

    from actors import columns as C
    from bench._shapes import collate, world_rows
    from actors.shapes.tokenizer import load_tokenizer
    from student.model.builder import build_processor, llava_config
    from student.model.presets import get_preset
    from student.vision_pretrain import VisionPretrainConfig, pretrain_vision_tower

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    world = a.world
    if world is None:  # the demo's world (3000 images, seed 0), generated once
        world = Path("/tmp/position-probe-world")
        if not (world / "train").exists():
            from bench._shapes import make_world

            make_world(world, size=3000)
    tok = load_tokenizer(world / "tokenizer")
    preset = get_preset("tiny")
    vision = replace(preset.vision, patch_size=a.patch_size, num_layers=a.vision_layers or preset.vision.num_layers)
    llm = replace(preset.teacher, hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_layers=a.layers)
    if a.heads:
        llm = replace(llm, num_heads=a.heads, num_kv_heads=a.heads)
    if a.head_dim:
        llm = replace(llm, head_dim=a.head_dim)
    if a.rope_theta:
        llm = replace(llm, rope_theta=a.rope_theta)
    cfg = llava_config(vision, llm, tok)
    layers = [int(x) for x in a.feature_layers.split(",")]
    cfg.vision_feature_layer = layers[0] if len(layers) == 1 else layers
    model = LlavaForConditionalGeneration(cfg)
    if a.ground_weight:
        model.set_attn_implementation("eager")  # the grounding loss reads attention weights
    proc = build_processor(tok, vision.image_size, vision.patch_size)
    ip = proc.image_processor
    n_img = vision.num_patches
    layout_ids = None
    if a.layout == "words":
        from actors.shapes.vocab import POSITIONS

        if n_img != len(POSITIONS):
            raise SystemExit(f"--layout words needs one image token per cell: --patch-size {vision.image_size // 3}")
        layout_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in POSITIONS]

    chats = [r for r in pq.read_table(world / "train").to_pylist() if r["task"] == "chat"]  # + per-cell labels
    train = world_rows(world, proc, split="train", tasks=("chat",))
    val = world_rows(world, proc, split="val", tasks=("caption", "vqa", "pope"))
    if layout_ids is not None:
        train, val = ([with_cell_names(r, layout_ids, tok.image_token_id) for r in rows] for rows in (train, val))
    objects = {r["id"]: sum(r["cell_present"]) for r in pq.read_table(world / "val", columns=["id", "cell_present"]).to_pylist()}
    tower = model.model.vision_tower
    if a.position_init_std is not None:
        with torch.no_grad():
            tower.embeddings.position_embedding.weight.normal_(0, a.position_init_std)
    t0 = time.time()
    pretrain_vision_tower(tower, chats, image_mean=ip.image_mean, image_std=ip.image_std,
                          cfg=VisionPretrainConfig(seed=a.seed, position_dims=a.position_dims,
                                                    position_scale=a.position_scale,
                                                    position_weight=a.position_weight), progress=False)
    vision_s = time.time() - t0
    for p in tower.parameters():
        p.requires_grad_(False)
    if a.position_code_scale:
        code = nn.Parameter(torch.randn(n_img, a.hidden) * a.position_code_scale)
        model.register_parameter("position_code", code)
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: out + code)

    def batch(rows):
        b = collate(rows, tok.pad_token_id)
        return b[C.INPUT_IDS], b[C.ATTENTION_MASK], b[C.LABELS], b[C.PIXEL_VALUES]

    norms = [p for n, p in model.named_parameters() if p.requires_grad and ("q_norm" in n or "k_norm" in n)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not ("q_norm" in n or "k_norm" in n)]
    params = [{"params": rest}, {"params": norms, "lr": a.lr * a.qk_norm_lr}]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=a.weight_decay)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    pick = random.Random(1).sample(range(len(val)), min(a.eval_records, len(val)))

    @torch.no_grad()
    def accuracy() -> dict[str, float]:
        model.eval()
        hits: dict[str, list[bool]] = {}
        for s in range(0, len(pick), 64):
            b = [val[i] for i in pick[s:s + 64]]
            ids, att, lab, px = batch(b)
            pred = model(input_ids=ids, attention_mask=att, pixel_values=px).logits[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            wrong = (pred != tgt) & (tgt != -100)
            for r, miss, t in zip(b, wrong, tgt):
                kind = r[C.SUBTASK] if r[C.TASK] == "vqa" else r[C.TASK]
                hits.setdefault(kind, []).append(not miss.any())
                if r[C.TASK] == "vqa":
                    hits.setdefault(f"{kind}@{objects[r[C.ID]]}", []).append(not miss.any())
                elif r[C.TASK] == "caption" and miss.any():  # what the first wrong word of a caption is
                    word = tok.convert_ids_to_tokens(int(t[miss.nonzero()[0, 0]]))
                    hits.setdefault(f"caption-miss:{word_kind(word)}", []).append(True)
        model.train()
        return {k: (round(100 * float(np.mean(v)), 1) if not k.startswith("caption-miss") else len(v))
                for k, v in sorted(hits.items())}

    def sampled_batches():
        """Random batches, regrouped by row length every `--length-window` (student.training.worker)."""
        from student.training.worker import length_buckets

        def plain():
            while True:
                rows = random.sample(train, a.batch_size)
                ids, objs = (np.empty(len(rows), dtype=object) for _ in range(2))
                ids[:] = [r[C.INPUT_IDS] for r in rows]
                objs[:] = rows
                yield {C.ID: np.array([r[C.ID] for r in rows], dtype=object), C.INPUT_IDS: ids, "rows": objs}

        for b in length_buckets(plain(), a.length_window, seed=a.seed):
            yield list(b["rows"])

    from actors.shapes.grounding import token_words
    from student.training.step import StepContext, grounding_term

    from actors.shapes.grounding import patch_cells, question_cells
    from student.losses import grounding_loss

    labels_of = {r["id"]: r for r in chats}
    cell_of_patch = torch.from_numpy(patch_cells(vision.image_size // vision.patch_size))

    def question_term(attentions, ids, lab, row_ids):
        """The ground term of answers whose cells come from the image's labels: the answer's first
        word, from the position before it, onto every cell `question_cells` names."""
        rows, queries, masks = [], [], []
        for b in range(ids.shape[0]):
            image = ids[b] == tok.image_token_id
            if int(image.sum()) != len(cell_of_patch):
                continue
            answer = (lab[b] != C.IGNORE_INDEX).tolist()
            t, prev = 0, 0
            while t < len(answer):
                if not answer[t]:
                    t += 1
                    continue
                end = t + answer[t:].index(False) if False in answer[t:] else len(answer)
                asked = tok.decode([i for i in ids[b, prev:t].tolist() if i != tok.image_token_id],
                                   skip_special_tokens=True).strip().split("\n")[-1].strip()
                cells = question_cells(asked, labels_of[row_ids[b]])
                if cells:
                    key_cell = torch.full_like(ids[b], -1)
                    key_cell[image] = cell_of_patch
                    rows.append(b)
                    queries.append(t - 1)
                    masks.append(torch.isin(key_cell, torch.tensor(cells)))
                prev = t = end
        if not rows:
            return torch.zeros(())
        return grounding_loss(list(attentions[1:]), torch.tensor(rows), torch.tensor(queries), torch.stack(masks))

    ground_ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id,
                             ground_words=tuple(token_words(tok)), patches_per_side=vision.image_size // vision.patch_size)

    model.train()
    t0 = time.time()
    stream = sampled_batches()
    for step in range(1, a.steps + 1):
        rows_now = next(stream)
        ids, att, lab, px = batch(rows_now)
        if a.ground_weight:
            out = model(input_ids=ids, attention_mask=att, pixel_values=px, labels=lab, output_attentions=True)
            loss = out.loss + a.ground_weight * grounding_term(out.attentions, ids, lab, ground_ctx)
            if a.ground_questions:
                row_ids = [r[C.ID] for r in rows_now]
                loss = loss + a.ground_weight * question_term(out.attentions, ids, lab, row_ids)
        else:
            loss = model(input_ids=ids, attention_mask=att, pixel_values=px, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rest + norms, 1.0)
        opt.step()
        sched.step()
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy()}), flush=True)
    train_s = time.time() - t0

    acc = accuracy()
    print(json.dumps({"bench": "teacher_position_probe", "args": {k: str(v) for k, v in vars(a).items()},
                      "vision_pretrain_s": round(vision_s, 1), "train_s": round(train_s, 1),
                      "final_loss": round(loss.item(), 4), "qk_gain": qk_gain(model), "accuracy": acc}))


if __name__ == "__main__":
    main()
