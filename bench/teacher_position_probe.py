"""Probe: how well a teacher LM reads the shapes world after N steps, per question type and object count.

The measurements behind docs/training.md "Where the position gets lost": the teacher stage's model
classes, tower pretraining and chats, in one process without Ray (minutes, not the demo's ten), with
switches for the variants the table compares. Opt-in in run_all (a research probe, not a ratio):

    .venv/bin/python bench/teacher_position_probe.py [--steps 600] [--seed 0] [--world DIR]
        [--feature-layers 0,-1] [--position-init-std 0.3] [--position-code-scale 1.0]
        [--layout words --patch-size 16] [--layers 3]

Prints one JSON line: exact-match accuracy (%) of the teacher-forced answer per task type
(caption, pope, and each VQA kind), and per object count for the VQA kinds ("position@2" ...).
`--position-code-scale` is the diagnostic hook (a learned vector per image token added to the
projector's output): not a standard HF module, so never used by the stage. One run swings by 15-30
points on the position questions: compare variants over several seeds.
"""
from __future__ import annotations

import argparse
import io
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

CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def encode(tok, messages, n_img: int, layout_ids: list[list[int]] | None):
    """ids, labels of a conversation (the data plane's encoding); with `layout_ids`, each image token is
    preceded by its cell's name (one image token per cell)."""
    from actors.preprocess import encode_conversation

    e = encode_conversation(tok, messages, image_token_id=tok.image_token_id, image_seq_length=n_img,
                            num_images=1, max_length=4096)
    ids, labels = e.input_ids.tolist(), e.labels.tolist()
    if layout_ids is None:
        return ids, labels
    out_ids, out_labels, cell = [], [], 0
    for i, l in zip(ids, labels):
        if i == tok.image_token_id:
            out_ids += layout_ids[cell]
            out_labels += [-100] * len(layout_ids[cell])
            cell += 1
        out_ids.append(i)
        out_labels.append(l)
    return out_ids, out_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=None, help="a generated shapes world (default: generate 3000 images)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--feature-layers", default="-1", help="vision_feature_layer: -1, or a list such as 0,-1")
    ap.add_argument("--position-init-std", type=float, default=None, help="re-initialise CLIP's position table")
    ap.add_argument("--position-code-scale", type=float, default=0.0, help="diagnostic hook; 0 = off")
    ap.add_argument("--layout", choices=("plain", "words"), default="plain")
    ap.add_argument("--eval-records", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

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
    vision = replace(preset.vision, patch_size=a.patch_size)
    llm = replace(preset.teacher, hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_layers=a.layers)
    cfg = llava_config(vision, llm, tok)
    layers = [int(x) for x in a.feature_layers.split(",")]
    cfg.vision_feature_layer = layers[0] if len(layers) == 1 else layers
    model = LlavaForConditionalGeneration(cfg)
    proc = build_processor(tok, vision.image_size, vision.patch_size)
    ip = proc.image_processor
    n_img = vision.num_patches
    layout_ids = None
    if a.layout == "words":
        if n_img != len(CELLS):
            raise SystemExit(f"--layout words needs one image token per cell: --patch-size {vision.image_size // 3}")
        layout_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in CELLS]

    train = pq.read_table(world / "train").to_pylist()
    chats = [r for r in train if r["task"] == "chat"]
    val = [r for r in pq.read_table(world / "val").to_pylist() if r["task"] in ("caption", "vqa", "pope")]
    tower = model.model.vision_tower
    if a.position_init_std is not None:
        with torch.no_grad():
            tower.embeddings.position_embedding.weight.normal_(0, a.position_init_std)
    t0 = time.time()
    pretrain_vision_tower(tower, chats, image_mean=ip.image_mean, image_std=ip.image_std,
                          cfg=VisionPretrainConfig(seed=a.seed), progress=False)
    vision_s = time.time() - t0
    for p in tower.parameters():
        p.requires_grad_(False)
    if a.position_code_scale:
        code = nn.Parameter(torch.randn(n_img, a.hidden) * a.position_code_scale)
        model.register_parameter("position_code", code)
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: out + code)

    pixels: dict = {}

    def pix(r):
        if r["image_id"] not in pixels:
            img = Image.open(io.BytesIO(r["image"])).convert("RGB")
            pixels[r["image_id"]] = torch.from_numpy(ip(images=[img], return_tensors="np")["pixel_values"][0])
        return pixels[r["image_id"]]

    enc_train = [encode(tok, r["messages"], n_img, layout_ids) for r in chats]
    enc_val = [encode(tok, r["messages"][:2], n_img, layout_ids) for r in val]

    def batch(rows, enc):
        T = max(len(i) for i, _ in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id)
        lab = torch.full((len(enc), T), -100)
        att = torch.zeros((len(enc), T), dtype=torch.long)
        for j, (i, l) in enumerate(enc):
            ids[j, :len(i)], lab[j, :len(l)], att[j, :len(i)] = torch.tensor(i), torch.tensor(l), 1
        return ids, att, lab, torch.stack([pix(r) for r in rows])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    t0 = time.time()
    for _ in range(a.steps):
        idx = random.sample(range(len(chats)), a.batch_size)
        ids, att, lab, px = batch([chats[i] for i in idx], [enc_train[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=att, pixel_values=px, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    train_s = time.time() - t0

    model.eval()
    pick = random.Random(1).sample(range(len(val)), min(a.eval_records, len(val)))
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for s in range(0, len(pick), 64):
            b = pick[s:s + 64]
            ids, att, lab, px = batch([val[i] for i in b], [enc_val[i] for i in b])
            pred = model(input_ids=ids, attention_mask=att, pixel_values=px).logits[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            ok = ((pred == tgt) | (tgt == -100)).all(1)
            for j, i in enumerate(b):
                r = val[i]
                kind = r["subtask"] if r["task"] == "vqa" else r["task"]
                hits.setdefault(kind, []).append(bool(ok[j]))
                if r["task"] == "vqa":
                    hits.setdefault(f"{kind}@{sum(r['cell_present'])}", []).append(bool(ok[j]))
    acc = {k: round(100 * float(np.mean(v)), 1) for k, v in sorted(hits.items())}
    print(json.dumps({"bench": "teacher_position_probe", "args": {k: str(v) for k, v in vars(a).items()},
                      "vision_pretrain_s": round(vision_s, 1), "train_s": round(train_s, 1),
                      "final_loss": round(loss.item(), 4), "accuracy": acc}))


if __name__ == "__main__":
    main()
