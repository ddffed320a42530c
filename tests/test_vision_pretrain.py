import pyarrow.parquet as pq
import pytest
import torch

from student.model.builder import build_processor, build_teacher
from student.model.presets import get_preset
from student.vision_pretrain import VisionPretrainConfig, cell_targets, pretrain_vision_tower, probe_accuracy


def _images(world, split):
    rows = pq.read_table(world / split).to_pylist()
    seen = {}
    for r in rows:
        seen.setdefault(r["image_id"], r)
    return list(seen.values())


def test_cell_targets_map_patches_to_cells():
    row = {k: list(range(9)) for k in ("cell_present", "cell_shape", "cell_colour", "cell_size")}
    t = cell_targets([row], patches_per_side=6)
    grid = t["cell"][0].view(6, 6)
    assert grid[0, 0] == grid[1, 1] == 0 and grid[0, 2] == 1 and grid[5, 5] == 8
    assert torch.equal(t["cell_shape"][0], t["cell"][0])
    with pytest.raises(ValueError, match="multiple"):
        cell_targets([row], patches_per_side=4)


def test_pretraining_makes_cells_linearly_readable(shapes_world, shapes_tokenizer):
    preset = get_preset("tiny")
    model = build_teacher(preset, shapes_tokenizer, seed=0)
    proc = build_processor(shapes_tokenizer, preset.vision.image_size, preset.vision.patch_size)
    ip = proc.image_processor
    tower = model.model.vision_tower
    train, val = _images(shapes_world, "train"), _images(shapes_world, "val")
    out = pretrain_vision_tower(tower, train, image_mean=ip.image_mean, image_std=ip.image_std,
                                cfg=VisionPretrainConfig(steps=150, seed=0), progress=False)
    acc = probe_accuracy(tower, out["heads"], val, image_mean=ip.image_mean, image_std=ip.image_std)
    assert acc["cell_present"] >= 0.97 and acc["cell"] >= 0.97, acc
    assert acc["cell_colour"] >= 0.9 and acc["cell_shape"] >= 0.75, acc
