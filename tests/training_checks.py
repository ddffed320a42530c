"""What the trainer tests read from a run: metrics per stage, the checkpoints Ray Train registered,
this session's Train worker processes, parameter diffs between checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def stage_records(run_dir, stage: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


def stage_experiment(run_dir, stage: str) -> Path | None:
    """Ray Train's storage folder of the stage's current attempt (RUN/stages/<stage>/run.json names it)."""
    record = Path(run_dir) / "stages" / stage / "run.json"
    return Path(run_dir) / "ray" / json.loads(record.read_text())["name"] if record.exists() else None


def registered_checkpoints(run_dir, stage: str) -> dict[str, int]:
    """{checkpoint folder: step} of the checkpoints Ray Train's controller has registered for the
    stage's current attempt. It picks up a reported checkpoint at its next poll of the workers (every
    2 s by default); a failure before that restarts from the previous one."""
    experiment = stage_experiment(run_dir, stage)
    snapshot = experiment / "checkpoint_manager_snapshot.json" if experiment is not None else None
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"] if snapshot and snapshot.exists() else []
    except (ValueError, KeyError):  # being written
        return {}
    return {r["checkpoint_dir_name"]: int(r["metrics"]["step"]) for r in results}


def train_workers() -> list:
    """Ray Train worker processes of *this* test session: descendants of this process (the local Ray's
    raylet is our child), named by Ray's process title. Never anyone else's on a shared machine."""
    import psutil

    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def diff_by_trainability(before: dict, after: dict, trainable: set[str]) -> tuple[float, set[str]]:
    """(max |delta| over frozen params, names of trainable params that did not change at all)."""
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:5]
    frozen = max((float((after[n] - before[n]).abs().max()) for n in before if n not in trainable), default=0.0)
    unchanged = {n for n in trainable if torch.equal(before[n], after[n])}
    return frozen, unchanged
