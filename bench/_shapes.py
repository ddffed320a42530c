"""Shared set-up of the benches that train on the shapes world in process (not a bench: run_all skips `_*`).

Rows go through the data plane's own code (`actors.sources.load_source`, `actors.preprocess.
preprocess_record`, `actors.annotate.row_requests` / `entry_from_responses` / `teacher_columns`,
`actors.collate.pad_collate`), only without Ray Data around it, so a bench measures the trainer and
the teacher, not the streaming executor.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEACHER_KEY = "__teacher_key__"


def make_world(out: Path, size: int, seed: int = 0) -> Path:
    """A generated shapes world of `size` images (train/val/test splits) under `out`."""
    from actors.shapes.generate import GenerateConfig, generate_world

    generate_world(out, GenerateConfig(size=size, seed=seed), progress=False)
    return out


def world_rows(world: Path, processor, *, split: str = "train", tasks=("caption", "vqa", "pope"),
               limit: int | None = None) -> list[dict]:
    """Training rows (`actors.columns`) of the world's split, as the preprocessing actors make them."""
    from actors.preprocess import image_seq_length_of, preprocess_record
    from actors.recipe import SourceSpec
    from actors.sources import load_source

    table = load_source(SourceSpec(name="bench", format="shapes", path=str(world), split=split, tasks=tuple(tasks)))
    n_img = image_seq_length_of(processor)
    out = []
    for rec in table.to_pylist()[:limit]:
        out.append(preprocess_record(rec, processor, image_seq_length=n_img, max_length=1024, preference=False))
    return out


def batch_requests(rows: list[dict], plan, image_token_id: int) -> list:
    """One ScoreRequest per row (the annotator's requests: pixel_values, positions of the plan's masks)."""
    from actors.annotate import row_positions, row_requests

    reqs = []
    for r in rows:
        pos = row_positions(r, plan.positions, image_token_id)
        reqs += row_requests(r, plan, pos)
    return reqs


def with_teacher(rows: list[dict], requests: list, responses: list, plan, key) -> list[dict]:
    """The rows with the teacher columns the annotator attaches, from the responses to `requests`."""
    from actors.annotate import entry_from_responses, teacher_columns

    out = []
    for row, req, resp in zip(rows, requests, responses):
        entry = entry_from_responses(plan, req.positions, [resp])
        out.append({**row, **teacher_columns(plan, entry, key)})
    return out


def collate(rows: list[dict], pad_id: int) -> dict:
    """The trainer's batch: `pad_collate` over a columnar dict (what Ray Data hands the collate_fn)."""
    from actors.collate import pad_collate

    return pad_collate({k: [r[k] for r in rows] for k in rows[0]}, pad_id)
