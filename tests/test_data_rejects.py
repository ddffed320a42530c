"""Per-row rejects on a real local Ray: a LLaVA-format fixture with one undecodable image and one
missing file puts exactly those two rows in the rejects file, and the counts balance."""
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors import columns as C
from actors.pipeline import DataPlaneConfig, build_stage_data
from actors.preprocess import ProcessorSpec
from actors.recipe import parse_recipe

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def llava_fixture(tmp_path_factory):
    """8 good rows, one undecodable image, one missing file: LLaVA JSON + an image root."""
    root = tmp_path_factory.mktemp("llava")
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (64 + 8 * i, 64), COLOURS[name]).save(images / f"img{i}.png")  # sizes vary: the processor resizes
        rows.append({"id": f"good-{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": name}]})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    rows.insert(3, {"id": "broken", "image": "broken.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a square"}]})
    rows.insert(7, {"id": "missing", "image": "nowhere/missing.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a square"}]})
    path = root / "fixture.json"
    path.write_text(json.dumps(rows))
    return path, images


def _recipe(path, images):
    return parse_recipe({"name": "llava-fixture", "seed": 0, "stages": {"sft": {"sources": [
        {"name": "fixture", "format": "llava_json", "path": str(path), "image_root": str(images)}]}}})


def _config(**kw):
    return DataPlaneConfig(batch_size=4, preprocess_actors=(1, 1), **kw)


def test_bad_rows_land_in_the_rejects_file_and_the_counts_balance(ray_cluster, llava_fixture, shapes_world, tmp_path):
    path, images = llava_fixture
    data = build_stage_data(_recipe(path, images), "sft", processor=ProcessorSpec(tokenizer=str(shapes_world / "tokenizer")),
                            out_dir=tmp_path / "stages" / "sft", config=_config(max_reject_rate=0.5))
    assert data.plan is None and data.planned_rows == 10  # sft: no teacher stage at all
    rows = data.dataset.take_all()
    summary = data.close_pass()
    assert sorted(r[C.ID] for r in rows) == [f"good-{i}" for i in range(8)]
    assert summary["rows_in"] == 10 and summary["rows_out"] == 8 and summary["rows_rejected"] == 2
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"] and not summary["problems"]
    assert summary["reasons"] == {"missing_image": 1, "undecodable_image": 1}

    rejects = pq.read_table(tmp_path / "stages" / "sft" / "rejects.parquet").to_pylist()
    assert sorted((r["id"], r["reason"]) for r in rejects) == [("broken", "undecodable_image"), ("missing", "missing_image")]
    by_id = {r["id"]: r for r in rejects}
    assert "nowhere/missing.png does not exist" in by_id["missing"]["detail"]
    assert "broken.png" in by_id["broken"]["detail"]
    assert all(r["source"] == "fixture" and r["stage"] == "sft" and r["op"] == "preprocess" for r in rejects)
    stats = json.loads((tmp_path / "stages" / "sft" / "data_stats.json").read_text())
    assert stats["passes"][0]["rows_rejected"] == 2 and stats["planned_rows"] == 10
    for r in rows:  # the contract, through Ray Data's Arrow blocks
        assert r[C.INPUT_IDS].dtype.name == "int32" and r[C.PIXEL_VALUES].shape == (3, 48, 48)
        assert r[C.VISUAL_MASK].sum() == 36 and r[C.RESPONSE_MASK].dtype == bool


def test_a_reject_rate_over_the_threshold_stops_the_pass(ray_cluster, llava_fixture, shapes_world, tmp_path):
    path, images = llava_fixture
    data = build_stage_data(_recipe(path, images), "sft", processor=ProcessorSpec(tokenizer=str(shapes_world / "tokenizer")),
                            out_dir=tmp_path / "sft", config=_config(min_rows_to_judge=4))  # default threshold: 1%
    with pytest.raises(Exception, match=r"rows rejected \(\d+\.\d%\), above the threshold of 1\.0%") as e:
        data.dataset.take_all()
    assert "rejects.parquet" in str(e.value)
    assert (tmp_path / "sft" / "rejects.parquet").exists()
