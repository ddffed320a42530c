"""Evaluation records from a shapes-world split (DIR/<split>/part-*.parquet, actors/schema.py).

Only the tasks with a metric are kept (caption, vqa, pope); preference pairs are training data for
DPO, not questions, so they are counted as skipped rather than silently dropped.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from actors.schema import check_schema

__all__ = ["EVAL_TASKS", "load_split", "select_records"]

EVAL_TASKS = ("caption", "vqa", "pope")
COLUMNS = ("id", "image", "messages", "task", "subtask", "answer", "objects")


def select_records(rows: list[dict], limit: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """(records to evaluate, skipped counts by reason). `limit` keeps the first N evaluable records;
    files list an image's records together, so a limit still covers every task."""
    keep: list[dict] = []
    skipped: Counter = Counter()
    for r in rows:
        if r["task"] not in EVAL_TASKS:
            skipped[f"task:{r['task']}"] += 1
        elif not r.get("image"):
            skipped["no_image"] += 1
        elif not r.get("answer"):
            skipped["no_answer"] += 1
        elif limit is not None and len(keep) >= limit:
            skipped["over_limit"] += 1
        else:
            keep.append(r)
    return keep, dict(sorted(skipped.items()))


def load_split(data_dir: str | Path, split: str = "test", limit: int | None = None) -> tuple[list[dict], dict]:
    """Records of DIR/<split>/part-*.parquet in file order, and the skipped counts."""
    files = sorted((Path(data_dir) / split).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{Path(data_dir) / split}: no part-*.parquet files (is this a shapes-world directory?)")
    rows: list[dict] = []
    for f in files:
        schema = pq.read_schema(f)
        check_schema(schema, where=str(f))
        cols = [c for c in COLUMNS if c in schema.names]
        rows.extend(pq.read_table(f, columns=cols).to_pylist())
    return select_records(rows, limit)
