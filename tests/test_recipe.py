from pathlib import Path

import pytest
import yaml

from actors.recipe import STAGES, load_recipe, parse_recipe, recipe_dict, resolve_path

RECIPES = Path(__file__).resolve().parents[1] / "datasets"


@pytest.mark.parametrize("name", ["shapes", "llava_mod", "llava_kd"])
def test_bundled_recipes_load_and_round_trip(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.stages and set(recipe.stages) <= set(STAGES)
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe_dict(recipe)))) == recipe


def test_papers_hyper_parameters():
    mod = load_recipe(RECIPES / "llava_mod.yaml")
    assert [mod.stages[s].optim.lr for s in ("init", "d2d", "d2s", "preference")] == [1e-4, 2e-5, 2e-5, 2e-6]
    assert mod.stages["d2s"].loss.ce == 1.0 and mod.stages["d2s"].loss.kd == 1.0
    assert mod.stages["d2d"].optim.betas == (0.9, 0.98) and mod.stages["d2d"].optim.eps == 1e-6
    kd = load_recipe(RECIPES / "llava_kd.yaml")
    for s in ("dpt", "dft"):
        loss = kd.stages[s].loss
        assert (loss.res, loss.vis, loss.rel) == (1.0, 1.0, 0.5)


def test_shapes_recipe_covers_every_stage():
    assert set(load_recipe(RECIPES / "shapes.yaml").stages) == set(STAGES)


def base():
    return {"name": "x", "seed": 0, "stages": {"sft": {"sources": [
        {"name": "s", "format": "shapes", "path": "${world}"}]}}}


def test_unknown_key_is_named():
    data = base()
    data["stages"]["sft"]["optim"] = {"lr": 1e-3, "learning_rate": 1}
    with pytest.raises(ValueError, match=r"recipe.stages.sft.optim: unknown key\(s\) \['learning_rate'\]"):
        parse_recipe(data)


def test_wrong_type_and_bad_values_are_named():
    data = base()
    data["stages"]["sft"]["batch_size"] = "big"
    with pytest.raises(ValueError, match="stages.sft.batch_size: expected int"):
        parse_recipe(data)
    data = base()
    data["stages"]["bogus"] = data["stages"].pop("sft")
    with pytest.raises(ValueError, match="unknown stage"):
        parse_recipe(data)
    data = base()
    data["stages"]["sft"]["sources"][0]["format"] = "csv"
    with pytest.raises(ValueError, match="format must be one of"):
        parse_recipe(data)
    for key in ("repeat", "length_window"):
        data = base()
        data["stages"]["sft"][key] = 0
        with pytest.raises(ValueError, match=f"{key} must be >= 1, got 0"):
            parse_recipe(data)


def test_resolve_path(monkeypatch):
    monkeypatch.setenv("LLAVA_DATA", "/data")
    assert resolve_path("${LLAVA_DATA}/a.json") == "/data/a.json"
    assert resolve_path("${world}/train", {"world": "/w"}) == "/w/train"
    monkeypatch.delenv("LLAVA_DATA")
    with pytest.raises(ValueError, match=r"\$\{LLAVA_DATA\} is not set"):
        resolve_path("${LLAVA_DATA}/a.json", where="stages.d2d.sources[0].path")
