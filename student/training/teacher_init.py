"""The teacher stage's starting point for the embedded world: a fresh teacher whose vision tower is
pretrained on the world's per-cell labels (student.vision_pretrain), saved once by the driver.

Doing it in the driver, before Ray Train starts, means it runs once (not on every rank) and the
workers simply load RUN/stages/teacher/init/ like any other stage input.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from actors.recipe import Recipe

__all__ = ["teacher_init_dir", "prepare_teacher_init"]


def teacher_init_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "stages" / "teacher" / "init"


def _world_images(world: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    cols = ["image_id", "image", "cell_present", "cell_shape", "cell_colour", "cell_size"]
    seen: dict[str, dict] = {}
    for row in pq.read_table(world / split, columns=cols).to_pylist():
        seen.setdefault(row["image_id"], row)
    return list(seen.values())


def prepare_teacher_init(run_dir: Path, recipe: Recipe, *, steps: int = 300, echo=print) -> Path:
    """Build the preset's teacher, pretrain its vision tower, save model + processor. Idempotent."""
    from actors.shapes.tokenizer import load_tokenizer
    from student.model import build_processor, build_teacher, get_preset
    from student.vision_pretrain import VisionPretrainConfig, pretrain_vision_tower, probe_accuracy

    out = teacher_init_dir(run_dir)
    if (out / "config.json").exists():
        return out
    world = Path(run_dir) / "world"
    if not (world / "train").is_dir():
        raise FileNotFoundError(f"{world}: the teacher stage needs the shapes world (its per-cell labels)")
    preset = get_preset(recipe.model.preset)
    tok = load_tokenizer(world / "tokenizer")
    processor = build_processor(tok, preset.vision.image_size, preset.vision.patch_size)
    model = build_teacher(preset, tok, seed=recipe.seed)
    ip = processor.image_processor
    tower = model.model.vision_tower
    # A quarter of the tower's features carry the patch's cell: lifts "where is X?" on 3 seeds of 4
    # (docs/training.md, "Position in dimensions of the tower's own").
    cfg = VisionPretrainConfig(steps=steps, seed=recipe.seed, position_dims=tower.config.hidden_size // 4)
    result = pretrain_vision_tower(tower, _world_images(world, "train"), image_mean=ip.image_mean,
                                   image_std=ip.image_std, cfg=cfg)
    probe = probe_accuracy(tower, result.pop("heads"), _world_images(world, "val"),
                           image_mean=ip.image_mean, image_std=ip.image_std)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {**result, "config": asdict(cfg), "probe_val_accuracy": {k: round(v, 4) for k, v in probe.items()}}
    (out / "vision_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    echo(f"teacher vision tower pretrained on per-cell labels in {result['seconds']:.1f}s; held-out probe: "
         + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
    return out
