"""The main job's command line: run directory, resolved config, the world (training: test_training_*)."""
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from student.train import main

RECIPE = Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml"


def test_prepares_run_dir(tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["world"]["size"] = 30
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["--recipe", str(small), "--run-dir", str(run), "--seed", "3", "--prepare-only"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"]["seed"] == 3 and saved["flags"]["stage"] == "all"
    assert (run / "world" / "manifest.json").exists() and (run / "world" / "contact_sheet.png").exists()
    models = json.loads((run / "models.json").read_text())
    assert models["student_moe"]["num_experts"] == 4 and models["student_moe"]["top_k"] == 2
    assert models["teacher"]["language_model"] > 2 * models["student_dense"]["language_model"]
    assert models["student_moe"]["active"] < models["student_moe"]["total"]
    assert res.exit_code == 0 and "--prepare-only" in res.output, res.output


def test_stage_missing_from_recipe_is_a_usage_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "seed": 0, "stages": {"sft": {"sources": [
        {"name": "s", "format": "shapes", "path": "/x"}]}}}))
    res = CliRunner().invoke(main, ["--recipe", str(recipe), "--stage", "d2s", "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2 and "has no stage(s) ['d2s']" in res.output
