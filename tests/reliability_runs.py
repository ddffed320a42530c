"""Run directories for the reliability tests: the shapes recipe shrunk to a 12-image world, a d2d
stage of a few dozen rows, and the dense student d2d starts from (RUN/stages/init/hf)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def d2d_recipe_file(path: Path, *, rows: tuple[int, int] = (10, 34), batch_size: int = 4) -> Path:
    """datasets/shapes.yaml with a 12-image world and a d2d stage of exactly `rows` (captions, QA)
    source rows, one epoch, global batch `batch_size`; written as YAML (what `python -m student.train --recipe` reads).
    Short single-turn rows (not the recipe's chats) keep the teacher's share of a test small."""
    recipe = yaml.safe_load((REPO / "datasets" / "shapes.yaml").read_text())
    recipe["world"].update(size=12, seed=7)
    d2d = copy.deepcopy(recipe["stages"]["d2d"])
    d2d["sources"] = [{"name": "shapes-captions", "format": "shapes", "path": "${world}", "split": "train",
                       "tasks": ["caption"]},
                      {"name": "shapes-qa", "format": "shapes", "path": "${world}", "split": "train",
                       "tasks": ["vqa", "pope"]}]
    for source, n in zip(d2d["sources"], rows):  # weights = sizes: every row once a pass, no mixing copies
        source.update(max_rows=n, weight=float(n))
    d2d.update(batch_size=batch_size, epochs=1.0)
    d2d.pop("max_steps", None)
    recipe["stages"] = {"d2d": d2d}
    path.write_text(yaml.safe_dump(recipe))
    return path


def prepare_d2d_run(run: Path, recipe_file: Path, tokenizer=None) -> Path:
    """The world (as `python -m student.train` generates it) and a fresh tiny dense student at
    RUN/stages/init/hf, tokenized by `tokenizer` (default: the world's)."""
    from actors.recipe import load_recipe
    from actors.shapes.tokenizer import load_tokenizer
    from student.model import build_processor, build_student, export, get_preset
    from student.train import prepare_world

    from student.run_dir import write_json
    from student.train import describe_models

    recipe = load_recipe(recipe_file)
    prepare_world(recipe, run)
    tok = tokenizer or load_tokenizer(run / "world" / "tokenizer")
    write_json(run / "models.json", describe_models(recipe, tok))  # as the CLI writes it (once per run directory)
    export(build_student(get_preset("tiny"), tok, seed=0), build_processor(tok), run / "stages" / "init" / "hf")
    return run


def other_tokenizer():
    """The shapes tokenizer's special tokens with other merges: ordinary tokens get other ids."""
    from actors.shapes.tokenizer import build_tokenizer

    return build_tokenizer(corpus=["a large red circle at the top left", "what colour is the square?"] * 20)


def cli_env(address: str) -> dict:
    env = dict(os.environ, RAY_ADDRESS=address, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env
