"""Run directories: one per run, named uniquely, holding the resolved config next to checkpoints."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from actors.recipe import Recipe, recipe_dict


def new_run_name(recipe: Recipe) -> str:
    """Ray Train resumes a run with the same name silently, so every run gets its own."""
    return f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 100000:05d}"


def write_resolved_config(run_dir: Path, recipe: Recipe, flags: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump({"recipe": recipe_dict(recipe), "flags": flags}, sort_keys=False))
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
