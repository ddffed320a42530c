"""Annotated training rows for the trainer tests, made in-process from a generated shapes world.

Stand-in until the data plane (actors preprocess + annotate) lands: a tiny real teacher (a Llava
model with seeded random weights) scores each row the way the teacher service does: top-k log-probs
with the exact tail mass at response + visual positions, the visual relation matrix, and the summed
log-probs of chosen/rejected answers. Rows follow `actors.columns`.
"""
from __future__ import annotations

import glob
import io

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from actors import columns as C
from student.losses import TopKTeacher, relation_matrix, select_mask, sequence_logps

TOP_K = 16


def _encode(processor, image, messages, answer):
    tok = processor.tokenizer
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = prompt + answer + tok.eos_token
    ids = processor(images=[image], text=[full], return_tensors="pt")
    head = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    input_ids = ids["input_ids"][0]
    labels = input_ids.clone()
    labels[:head] = C.IGNORE_INDEX
    return input_ids, labels, ids["pixel_values"][0]


@torch.no_grad()
def _annotate(teacher, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor, image_token_id: int):
    logits = teacher(input_ids=ids[None], pixel_values=pixels[None], attention_mask=torch.ones_like(ids)[None]).logits
    resp = select_mask("response", labels=labels[None])
    vis = select_mask("visual", input_ids=ids[None], image_token_id=image_token_id)
    mask = resp | vis
    top = TopKTeacher.from_logits(logits[mask], TOP_K)
    rel = relation_matrix(logits[vis])
    return {
        C.TEACHER_POSITIONS: mask[0].nonzero().squeeze(1).numpy().astype(np.int32),
        C.TEACHER_TOPK_IDS: top.ids.numpy().astype(np.int32),
        C.TEACHER_TOPK_LOGPROBS: top.logprobs.numpy().astype(np.float16),
        C.TEACHER_TAIL_LOGMASS: top.tail_logmass.numpy().astype(np.float32),
        C.TEACHER_RELATION: (rel / rel.norm()).numpy().astype(np.float32),
    }


@torch.no_grad()
def _seq_logp(teacher, ids, labels, pixels) -> float:
    logits = teacher(input_ids=ids[None], pixel_values=pixels[None]).logits
    return float(sequence_logps(logits, labels[None])[0])


def annotated_rows(world_dir, processor, teacher, tasks=("caption", "vqa", "pope"), limit: int = 32) -> list[dict]:
    """Up to `limit` annotated rows of the world's train split with the given tasks."""
    table = pq.read_table(sorted(glob.glob(f"{world_dir}/train/*.parquet")))
    teacher.eval()
    image_token_id = processor.tokenizer.image_token_id
    out = []
    for rec in table.to_pylist():
        if rec["task"] not in tasks:
            continue
        image = Image.open(io.BytesIO(rec["image"])).convert("RGB")
        row = {C.ID: rec["id"], C.TASK: rec["task"], C.SUBTASK: rec["subtask"] or ""}
        if rec["task"] == "preference":
            ci, cl, pixels = _encode(processor, image, rec["messages"], rec["chosen"])
            ri, rl, _ = _encode(processor, image, rec["messages"], rec["rejected"])
            row.update({C.CHOSEN_INPUT_IDS: ci.numpy().astype(np.int32), C.CHOSEN_LABELS: cl.numpy().astype(np.int32),
                        C.REJECTED_INPUT_IDS: ri.numpy().astype(np.int32), C.REJECTED_LABELS: rl.numpy().astype(np.int32),
                        C.PIXEL_VALUES: pixels.numpy(),
                        C.TEACHER_CHOSEN_LOGP: _seq_logp(teacher, ci, cl, pixels),
                        C.TEACHER_REJECTED_LOGP: _seq_logp(teacher, ri, rl, pixels)})
        else:
            ids, labels, pixels = _encode(processor, image, rec["messages"], rec["messages"][1]["content"])
            vis = (ids == image_token_id).numpy()
            resp = (labels != C.IGNORE_INDEX).numpy()
            row.update({C.INPUT_IDS: ids.numpy().astype(np.int32), C.LABELS: labels.numpy().astype(np.int32),
                        C.ATTENTION_MASK: np.ones(len(ids), np.int8), C.RESPONSE_MASK: resp,
                        C.INSTRUCTION_MASK: ~resp & ~vis, C.VISUAL_MASK: vis, C.PIXEL_VALUES: pixels.numpy()})
            row.update(_annotate(teacher, ids, labels, pixels, image_token_id))
        out.append(row)
        if len(out) >= limit:
            break
    return out


def tiny_recipe(batch_size: int = 4, max_steps: dict | None = None):
    """datasets/shapes.yaml with every stage's global batch set to `batch_size` (a tiny world), one
    epoch of one copy of the data, and optional per-stage max_steps."""
    import dataclasses
    from pathlib import Path

    from actors.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml")
    steps = max_steps or {}
    stages = {k: dataclasses.replace(v, batch_size=batch_size, epochs=1.0, repeat=1,
                                     max_steps=steps.get(k))
              for k, v in recipe.stages.items()}
    return dataclasses.replace(recipe, stages=stages, world=dataclasses.replace(recipe.world, size=12, seed=7))


STAGE_TASKS = {"preference": ("preference",), "init": ("caption",), "dpt": ("caption",)}


def prepare_run(run_dir, stages, rows_per_stage: int = 4, copies: int | dict = 1, parquet: bool = False) -> tuple:
    """(run dir, {stage: rows}): a run directory with a generated world and a tiny teacher at
    RUN/teacher, and annotated rows per stage: `rows_per_stage` distinct rows, each repeated `copies`
    times under ids "<id>#<copy>" (a repeated batch within one epoch, so a test pays one epoch
    start-up). parquet=True also writes them to RUN/data/<stage> (what `--data` reads)."""
    from pathlib import Path

    from actors.shapes.generate import GenerateConfig, generate_world
    from actors.shapes.tokenizer import load_tokenizer
    from student.model import build_processor, build_teacher, export, get_preset
    from student.training.data import write_annotated_parquet

    run = Path(run_dir)
    generate_world(run / "world", GenerateConfig(size=12, seed=7), progress=False)
    tok = load_tokenizer(run / "world" / "tokenizer")
    processor = build_processor(tok)
    teacher = build_teacher(get_preset("tiny"), tok, seed=1)
    export(teacher, processor, run / "teacher")
    data = {}
    for stage in stages:
        tasks = STAGE_TASKS.get(stage, ("caption", "vqa", "pope"))
        rows = annotated_rows(run / "world", processor, teacher, tasks, rows_per_stage)
        n = copies.get(stage, 1) if isinstance(copies, dict) else copies
        data[stage] = [{**r, "id": f"{r['id']}#{c}"} for c in range(n) for r in rows]
        if parquet:
            write_annotated_parquet(data[stage], run / "data" / stage)
    return run, data


def in_memory(rows: list[dict]):
    """(Ray Dataset, rows) from rows held by the driver: no read tasks to start (the tests pay Ray's
    per-stage start-up once per stage already; `--data` reads Parquet through annotated_parquet)."""
    import ray.data

    return ray.data.from_items(rows), len(rows)
