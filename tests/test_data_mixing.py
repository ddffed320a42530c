"""Source mixing: weights per stage, deterministic for a seed, unique ids."""
import pytest

from actors.mixing import copies, mix_rates, mix_sources
from actors.recipe import load_recipe
from actors.sources import (
    SOURCE_SCHEMA,
    llava_record,
    load_source,
    preference_record,
    records_table,
)


def _table(name, n):
    return records_table({"id": f"{name}-{i}", "source": name, "task": name, "messages": []} for i in range(n))


def test_rates_give_each_source_its_weight_of_the_epoch():
    rates = mix_rates({"a": 100, "b": 700}, {"a": 0.3, "b": 0.7})
    assert rates["a"] == pytest.approx(2.4) and rates["b"] == pytest.approx(0.8)
    assert mix_rates({"a": 5}, {"a": 3.0}) == {"a": 1.0}
    with pytest.raises(ValueError, match=r"\['b'\] have no rows"):
        mix_rates({"a": 5, "b": 0}, {"a": 1.0, "b": 1.0})
    assert copies("x", 1.0, 0, "a") == 1 and copies("x", 3.0, 5, "a") == 3


def test_repeat_puts_copies_of_the_mix_in_one_epoch():
    tables = {"a": _table("a", 50), "b": _table("b", 150)}
    once, _, rates1 = mix_sources(tables, {"a": 1.0, "b": 3.0}, seed=3)  # one copy of every row
    thrice, _, rates3 = mix_sources(tables, {"a": 1.0, "b": 3.0}, seed=3, repeat=3)
    assert rates1 == {"a": 1.0, "b": 1.0} and rates3 == {"a": 3.0, "b": 3.0}
    assert thrice.num_rows == 3 * once.num_rows == 600
    ids = thrice["id"].to_pylist()
    assert len(set(ids)) == len(ids) and {i.split("#")[0] for i in ids} == set(once["id"].to_pylist())
    assert ids[:200] != once["id"].to_pylist()  # the copies are shuffled together, not appended
    with pytest.raises(ValueError, match="repeat"):
        mix_sources(tables, {"a": 1.0, "b": 1.0}, seed=3, repeat=0)


def test_mixing_is_deterministic_weighted_and_keeps_ids_unique():
    tables = {"captions": _table("captions", 200), "qa": _table("qa", 1400)}
    mixed, sizes, rates = mix_sources(tables, {"captions": 0.3, "qa": 0.7}, seed=1)
    assert sizes == {"captions": 200, "qa": 1400} and rates["captions"] == pytest.approx(2.4)
    again, _, _ = mix_sources(tables, {"captions": 0.3, "qa": 0.7}, seed=1)
    other, _, _ = mix_sources(tables, {"captions": 0.3, "qa": 0.7}, seed=2)
    assert mixed.schema.equals(SOURCE_SCHEMA)
    assert mixed["id"].to_pylist() == again["id"].to_pylist() != other["id"].to_pylist()
    ids = mixed["id"].to_pylist()
    assert len(set(ids)) == len(ids)  # repeats carry #k suffixes
    share = sum(s == "captions" for s in mixed["source"].to_pylist()) / len(ids)
    assert abs(len(ids) - 1600) < 80 and 0.26 < share < 0.34
    assert any(i.endswith("#2") for i in ids if i.startswith("captions"))
    # the order is interleaved, not source after source
    first = [s for s in mixed["source"].to_pylist()[:100]]
    assert 10 < first.count("captions") < 50


def test_sources_normalise_llava_and_rlaif_records(tmp_path):
    rec = llava_record({"id": 7, "image": "a/b.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}, {"from": "robot", "value": "?"}]},
        source="s", index=0, image_root=str(tmp_path))
    assert rec["id"] == "7" and rec["image_path"] == str(tmp_path / "a/b.jpg")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "robot"]  # kept for preprocessing to reject
    pref = preference_record({"image": {"bytes": b"png", "path": None}, "question": "Describe.", "chosen": "c",
                              "rejected": "r", "idx": 3}, source="p", index=0, image_root=None)
    assert pref["image"] == b"png" and pref["messages"][0]["content"] == "<image>\nDescribe."
    assert pref["chosen"] == "c" and pref["rejected"] == "r" and pref["id"] == "3"
    assert records_table([rec, pref]).num_rows == 2


def test_shapes_sources_filter_tasks(shapes_world):
    recipe = load_recipe("datasets/shapes.yaml")
    d2d = recipe.stages["d2d"]
    chats = load_source(d2d.sources[0], {"world": str(shapes_world)})
    assert set(chats["task"].to_pylist()) == {"chat"} and all(len(m) > 2 for m in chats["messages"].to_pylist())
    tables = {s.name: load_source(s, {"world": str(shapes_world)}) for s in recipe.stages["dft"].sources}
    assert set(tables["shapes-all"]["task"].to_pylist()) == {"caption", "vqa", "pope"}
    assert set(load_source(recipe.stages["init"].sources[0], {"world": str(shapes_world)})["task"].to_pylist()) == {
        "caption"}
    pref = load_source(recipe.stages["preference"].sources[0], {"world": str(shapes_world)})
    assert set(pref["task"].to_pylist()) == {"preference"} and all(pref["chosen"].to_pylist())
    with pytest.raises(ValueError, match=r"\$\{world\} is not set"):
        load_source(d2d.sources[0], {})
