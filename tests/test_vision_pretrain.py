import pyarrow.parquet as pq
import pytest
import torch

from student.model.builder import build_processor, build_teacher
from student.model.presets import get_preset
from student.vision_pretrain import (
    VisionPretrainConfig, cell_targets, patch_features, position_code, pretrain_vision_tower, probe_accuracy,
)


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


def test_position_code_names_row_and_column():
    code = position_code(32)
    assert code.shape == (9, 32)
    assert torch.allclose(code.mean(0), torch.zeros(32), atol=1e-6)
    assert abs(code.pow(2).mean().item() - 1.0) < 1e-5
    # the first 3 features are the row one-hot, the next 3 the column one-hot (centred)
    assert torch.equal(code[0, :3], code[2, :3]) and not torch.equal(code[0, :3], code[3, :3])  # same row
    assert torch.equal(code[0, 3:6], code[6, 3:6]) and not torch.equal(code[0, 3:6], code[1, 3:6])  # same column
    assert len({tuple(c.tolist()) for c in code}) == 9


def test_pretraining_makes_cells_linearly_readable(shapes_world, shapes_tokenizer):
    """Content heads read the first features; the last `position_dims` carry the cell's code, as loud as them."""
    preset = get_preset("tiny")
    model = build_teacher(preset, shapes_tokenizer, seed=0)
    proc = build_processor(shapes_tokenizer, preset.vision.image_size, preset.vision.patch_size)
    ip = proc.image_processor
    tower = model.model.vision_tower
    train, val = _images(shapes_world, "train"), _images(shapes_world, "val")
    dims = tower.config.hidden_size // 4
    with pytest.raises(ValueError, match="position_dims"):
        pretrain_vision_tower(tower, train, image_mean=ip.image_mean, image_std=ip.image_std,
                              cfg=VisionPretrainConfig(steps=1, position_dims=tower.config.hidden_size), progress=False)
    out = pretrain_vision_tower(tower, train, image_mean=ip.image_mean, image_std=ip.image_std,
                                cfg=VisionPretrainConfig(steps=150, seed=0, position_dims=dims), progress=False)
    acc = probe_accuracy(tower, out["heads"], val, image_mean=ip.image_mean, image_std=ip.image_std)
    assert acc["cell_present"] >= 0.97 and acc["cell"] >= 0.97, acc
    assert acc["cell_colour"] >= 0.9 and acc["cell_shape"] >= 0.7, acc  # 72 training images: chance is 0.25

    side = preset.vision.image_size // preset.vision.patch_size
    with torch.no_grad():
        h = patch_features(tower, val, image_mean=ip.image_mean, image_std=ip.image_std)
    content, pos = h[..., :-dims], h[..., -dims:]
    cells = cell_targets(val, side)["cell"]
    nearest = torch.cdist(pos.reshape(-1, dims), position_code(dims) * pos.pow(2).mean().sqrt()).argmin(-1)
    assert (nearest == cells.reshape(-1)).float().mean() >= 0.97
    ratio = (pos.pow(2).mean() / content.pow(2).mean()).sqrt().item()
    assert 0.6 <= ratio <= 1.5, ratio
