"""The shapes world checked against its own pixels and ground truth."""
import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.schema import RECORD_SCHEMA, check_schema
from actors.shapes.tasks import NUMBER_WORDS, caption, parse_mentions
from actors.shapes.vocab import BACKGROUND, COLOURS, POSITIONS, SHAPES
from actors.shapes.world import GRID, Obj, WorldConfig, combo_prior, object_centre, render, sample_scene


def rows(world, split):
    return pq.read_table(world / split).to_pylist()


def objset(objs):
    return {(o["size"], o["colour"], o["shape"], o["position"]) for o in objs}


def mention_set(text):
    return {(o.size, o.colour, o.shape, o.position) for o in parse_mentions(text)}


def test_schema_matches_declared(shapes_world):
    table = pq.read_table(shapes_world / "train")
    check_schema(table.schema)
    assert table.schema.remove_metadata().equals(RECORD_SCHEMA.remove_metadata())


def test_object_centres_have_object_colour():
    cfg = WorldConfig()
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = sample_scene(rng, cfg)
        pixels = np.asarray(render(scene, cfg))
        for obj, off in zip(scene.objects, scene.offsets):
            x, y = object_centre(obj, off, cfg)
            assert tuple(pixels[y, x]) == COLOURS[obj.colour], obj


def test_stored_images_match_their_objects(shapes_world):
    cell = 48 // GRID
    for r in rows(shapes_world, "val"):
        if r["task"] != "caption":
            continue
        px = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        assert px.shape == (48, 48, 3)
        by_pos = {o["position"]: o for o in r["objects"]}
        for c, name in enumerate(POSITIONS):
            row, col = divmod(c, GRID)
            centre = tuple(px[row * cell + cell // 2, col * cell + cell // 2])
            want = COLOURS[by_pos[name]["colour"]] if name in by_pos else BACKGROUND
            assert centre == want, (r["id"], name)
        # Per-cell labels for vision pretraining agree with the objects.
        assert sum(r["cell_present"]) == len(r["objects"])
        for o in r["objects"]:
            c = POSITIONS.index(o["position"])
            assert r["cell_present"][c] == 1 and SHAPES[r["cell_shape"][c]] == o["shape"]


def test_every_image_has_1_to_4_objects_in_distinct_cells(shapes_world):
    for split in ("train", "val", "test"):
        for r in rows(shapes_world, split):
            positions = [o["position"] for o in r["objects"]]
            assert 1 <= len(positions) <= 4 and len(set(positions)) == len(positions)


def test_pope_is_balanced_and_truthful(shapes_world):
    prior = combo_prior(WorldConfig().popularity_skew)
    answers = Counter()
    for split in ("train", "val", "test"):
        for r in rows(shapes_world, split):
            if r["task"] != "pope":
                continue
            answers[(r["subtask"], r["answer"])] += 1
            q = r["messages"][0]["content"]
            colour, shape = q.removeprefix("<image>Is there a ").removesuffix(" in the image?").split()
            present = {(o["colour"], o["shape"]) for o in r["objects"]}
            assert ((colour, shape) in present) == (r["answer"] == "yes"), r["id"]
            if r["answer"] == "no" and r["subtask"] == "adversarial":
                assert any(colour == c or shape == s for c, s in present)
            if r["answer"] == "no" and r["subtask"] == "popular":
                absent = sorted((cs for cs in prior if cs not in present), key=lambda cs: -prior[cs])
                assert (colour, shape) in absent[:3]
    for kind in ("random", "popular", "adversarial"):
        assert answers[(kind, "yes")] == answers[(kind, "no")] > 0, answers


def test_rejected_differs_by_exactly_one_hallucination(shapes_world):
    kinds = Counter()
    for r in rows(shapes_world, "train"):
        if r["task"] != "preference":
            continue
        chosen, rejected = mention_set(r["chosen"]), mention_set(r["rejected"])
        assert chosen == objset(r["objects"])  # chosen is faithful
        extra, missing = rejected - chosen, chosen - rejected
        assert len(extra) == 1, (r["id"], r["subtask"])
        if r["subtask"] == "object":
            assert not missing
        else:
            (new,), (old,) = extra, missing
            changed = [i for i in range(4) if new[i] != old[i]]
            # size, colour, shape, position: exactly one differs, and it is the one named.
            assert len(changed) == 1
            assert ("size", "colour", "shape", "position")[changed[0]] == r["subtask"]
        kinds[r["subtask"]] += 1
    assert set(kinds) == {"object", "colour", "shape", "size", "position"}


def test_eval_captions_are_clean_and_train_has_noise(shapes_world):
    for split in ("val", "test"):
        for r in rows(shapes_world, split):
            if r["task"] == "caption":
                assert not r["noisy"] and mention_set(r["answer"]) == objset(r["objects"])
    train = [r for r in rows(shapes_world, "train") if r["task"] == "caption"]
    noisy = [r for r in train if r["noisy"]]
    assert 0 < len(noisy) < len(train) * 0.4
    for r in train:
        extra = mention_set(r["answer"]) - objset(r["objects"])
        assert len(extra) == (1 if r["noisy"] else 0)
        assert objset(r["objects"]) <= mention_set(r["answer"])
        # The invented object sits in an empty cell, so the caption never contradicts a real one.
        assert not {e[3] for e in extra} & {o["position"] for o in r["objects"]}


def test_vqa_answers_follow_from_objects(shapes_world):
    for r in rows(shapes_world, "val"):
        if r["task"] != "vqa":
            continue
        q = r["messages"][0]["content"].removeprefix("<image>")
        objs = r["objects"]
        a = r["messages"][1]["content"]
        assert a == r["answer"]
        if r["subtask"] == "shape":
            pos = q.removeprefix("What shape is at the ").removesuffix("?")
            assert [o["shape"] for o in objs if o["position"] == pos] == [a]
        elif r["subtask"] == "count" and q == "How many objects are there?":
            assert a == NUMBER_WORDS[len(objs)]
        elif r["subtask"] == "count":
            colour = q.split()[2]
            assert a == NUMBER_WORDS[sum(o["colour"] == colour for o in objs)]
        elif r["subtask"] == "position" and " at the " not in q:
            colour, shape = q.removeprefix("Where is the ").removesuffix("?").split()
            assert [o["position"] for o in objs if (o["colour"], o["shape"]) == (colour, shape)] == [a]
        elif r["subtask"] == "colour" and " at the " not in q:
            shape = q.removeprefix("What colour is the ").removesuffix("?")
            assert [o["colour"] for o in objs if o["shape"] == shape] == [a]


def test_ids_are_unique(shapes_world):
    ids = [r["id"] for s in ("train", "val", "test") for r in rows(shapes_world, s)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("bad", [
    dict(image_size=50), dict(patch_size=5), dict(min_objects=3, max_objects=2), dict(max_objects=5),
])
def test_world_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        WorldConfig(**bad)


def test_chat_records_hold_every_single_turn_answer_and_true_binding_drills(shapes_world):
    import pyarrow.parquet as pq

    from actors.shapes.tasks import CHAT_TURNS
    from actors.shapes.vocab import POSITIONS

    rows = pq.read_table(shapes_world / "train").to_pylist()
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    assert all(sum(r["task"] == "chat" for r in rs) >= 2 for rs in by_image.values())
    assert not any(r["task"] == "chat" for r in pq.read_table(shapes_world / "val").to_pylist())
    for rs in list(by_image.values())[:20]:
        chats = [r for r in rs if r["task"] == "chat"]
        pairs = []
        for chat in chats:
            msgs = chat["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            assert 2 <= len(msgs) // 2 <= CHAT_TURNS
            assert msgs[0]["content"].startswith("<image>") and all("<image>" not in m["content"] for m in msgs[1:])
            pairs += [(msgs[i]["content"].replace("<image>", ""), msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]
            assert not chat["noisy"] and chat["subtask"] == "clean"
        assert len({q for q, _ in pairs}) == len(pairs)  # each question asked once per image
        assert len({len(c["messages"]) for c in chats}) <= 2  # chats as even as can be
        for r in rs:
            if r["task"] in ("vqa", "pope") or (r["task"] == "caption" and not r["noisy"]):
                assert (r["messages"][0]["content"].replace("<image>", ""), r["answer"]) in pairs
        true_caption = caption([Obj(o["shape"], o["colour"], o["size"], POSITIONS.index(o["position"]))
                                for o in chats[0]["objects"]])
        assert ("Describe the image.", true_caption) in pairs  # the chats' caption is never the noisy one
        objects = {o["position"]: o for o in chats[0]["objects"]}
        for q, a in pairs:
            if q.startswith("What shape is at the "):
                assert objects[q[len("What shape is at the "):-1]]["shape"] == a
            if q.startswith("Where is the "):
                assert a in POSITIONS and a in objects


def test_chat_turns_cut_the_same_questions_into_more_chats(tmp_path):
    from actors.shapes.generate import GenerateConfig, generate_world

    with pytest.raises(ValueError, match="chat_turns"):
        GenerateConfig(chat_turns=0)
    counts = {}
    for turns in (3, 100):
        generate_world(tmp_path / str(turns), GenerateConfig(size=12, seed=1, chat_turns=turns), progress=False)
        chats = [r for r in rows(tmp_path / str(turns), "train") if r["task"] == "chat"]
        counts[turns] = (len(chats), sum(len(c["messages"]) for c in chats))
    assert counts[100][0] == 10 and counts[3][0] > 2 * counts[100][0]  # one chat per image vs several
    assert counts[3][1] == counts[100][1]  # the same turns either way
