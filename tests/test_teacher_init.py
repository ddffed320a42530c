import json
import shutil

from actors.recipe import load_recipe
from student.training.stage_model import stage_start_model
from student.training.teacher_init import prepare_teacher_init, teacher_init_dir


def test_teacher_stage_starts_from_the_pretrained_tower(shapes_world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shapes_world, run / "world")
    recipe = load_recipe("datasets/shapes.yaml")
    out = prepare_teacher_init(run, recipe, steps=20, echo=lambda s: None)
    assert out == teacher_init_dir(run) and (out / "config.json").exists()
    report = json.loads((out / "vision_pretrain.json").read_text())
    assert report["steps"] == 20 and set(report["probe_val_accuracy"]) >= {"cell_present", "cell_shape", "cell"}
    assert report["config"]["position_dims"] == 32 and report["config"]["seed"] == recipe.seed  # tiny tower: 128
    model, _ = stage_start_model("teacher", run, recipe)
    saved = (out / "model.safetensors").stat().st_mtime
    assert prepare_teacher_init(run, recipe, steps=20) == out and (out / "model.safetensors").stat().st_mtime == saved
    from student.model import load_model

    ref = load_model(out)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert a.equal(b), n
