"""Assertions shared by the trainer tests: metrics per stage, parameter diffs between checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def stage_records(run_dir, stage: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def diff_by_trainability(before: dict, after: dict, trainable: set[str]) -> tuple[float, set[str]]:
    """(max |delta| over frozen params, names of trainable params that did not change at all)."""
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:5]
    frozen = max((float((after[n] - before[n]).abs().max()) for n in before if n not in trainable), default=0.0)
    unchanged = {n for n in trainable if torch.equal(before[n], after[n])}
    return frozen, unchanged
