"""Metrics on hand-made predictions whose scores are known by hand."""
import json

import pytest

from actors.shapes.tasks import caption
from actors.shapes.vocab import POSITIONS
from actors.shapes.world import Obj
from student.eval.metrics import (
    caption_metrics,
    caption_score,
    normalize,
    pope_confusion_metrics,
    pope_label,
    pope_metrics,
    score_predictions,
    vqa_metrics,
)

RED = Obj(shape="circle", colour="red", size="small", cell=POSITIONS.index("top left"))
BLUE = Obj(shape="square", colour="blue", size="large", cell=POSITIONS.index("center"))
GHOST = Obj(shape="triangle", colour="green", size="small", cell=POSITIONS.index("bottom"))
OBJECTS = [dict(shape=o.shape, colour=o.colour, size=o.size, position=o.position) for o in (RED, BLUE)]


def test_normalize_and_pope_label():
    assert normalize("  Red.\n") == "red"
    assert normalize("top  left") == "top left"
    assert pope_label("Yes, there is.") == ("yes", True)
    assert pope_label("no") == ("no", True)
    assert pope_label("there is not one") == ("no", False)  # POPE's rule: a negation word means no
    assert pope_label("a red circle") == ("yes", False)  # anything else reads as yes, flagged unclear
    assert pope_label("") == ("yes", False)


def test_vqa_per_type_accuracy():
    items = [
        {"subtask": "colour", "answer": "red", "prediction": "Red."},
        {"subtask": "colour", "answer": "blue", "prediction": "blue"},
        {"subtask": "colour", "answer": "green", "prediction": "red"},
        {"subtask": "count", "answer": "two", "prediction": "three"},
    ]
    m = vqa_metrics(items)
    assert m["colour"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3}
    assert m["count"]["accuracy"] == 0.0
    assert m["overall"]["accuracy"] == 0.5 and m["overall"]["n"] == 4
    assert m["overall"]["type_mean_accuracy"] == pytest.approx((2 / 3 + 0) / 2)


def test_pope_confusion_cases():
    items = [
        # random: one of each cell -> everything 0.5
        {"subtask": "random", "answer": "yes", "prediction": "yes"},  # tp
        {"subtask": "random", "answer": "no", "prediction": "Yes."},  # fp
        {"subtask": "random", "answer": "no", "prediction": "No, there is not."},  # tn
        {"subtask": "random", "answer": "yes", "prediction": "no"},  # fn
        # popular: always yes -> recall 1, precision 1/2, yes-ratio 1
        {"subtask": "popular", "answer": "yes", "prediction": "yes"},
        {"subtask": "popular", "answer": "no", "prediction": "yes"},
        # adversarial: always no -> no positive predictions: precision, recall, F1 0; yes-ratio 0
        {"subtask": "adversarial", "answer": "yes", "prediction": "no"},
        {"subtask": "adversarial", "answer": "no", "prediction": "not there"},
    ]
    m = pope_metrics(items)
    r = m["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 1, 1)
    assert r["accuracy"] == r["precision"] == r["recall"] == r["f1"] == r["yes_ratio"] == 0.5
    p = m["popular"]
    assert (p["precision"], p["recall"], p["yes_ratio"], p["accuracy"]) == (0.5, 1.0, 1.0, 0.5)
    assert p["f1"] == pytest.approx(2 / 3)
    a = m["adversarial"]
    assert (a["precision"], a["recall"], a["f1"], a["yes_ratio"], a["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    assert a["unclear"] == 1
    o = m["overall"]
    assert (o["tp"], o["fp"], o["tn"], o["fn"], o["n"]) == (2, 2, 2, 2, 8)
    assert (o["precision"], o["recall"], o["f1"], o["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5)


def test_pope_rejects_a_non_binary_reference():
    with pytest.raises(ValueError, match="'r1'.*yes or no"):
        pope_metrics([{"id": "r1", "subtask": "random", "answer": "maybe", "prediction": "yes"}])


def test_empty_confusion_is_undefined_not_nan():
    m = pope_confusion_metrics(0, 0, 0, 0)
    assert m["accuracy"] is None and m["yes_ratio"] is None and m["n"] == 0


def test_one_hallucinated_object_gives_resp_1_and_ment_1_over_n():
    pred = caption([RED, BLUE, GHOST])  # the two real objects and one invented
    s = caption_score(pred, OBJECTS)
    assert s == {"mentions": 3, "hallucinated": 1, "hallucinated_kind": 1, "recalled": 2, "objects": 2}
    m = caption_metrics([{"answer": caption([RED, BLUE]), "prediction": pred, "objects": OBJECTS}])
    assert m["hallucination_resp"] == 1.0
    assert m["hallucination_ment"] == pytest.approx(1 / 3)
    assert m["object_recall"] == 1.0 and m["exact_match"] == 0.0


def test_caption_rates_over_several_captions():
    wrong_size = Obj(shape="circle", colour="red", size="large", cell=RED.cell)  # exists, but not as described
    items = [
        {"answer": caption([RED, BLUE]), "prediction": caption([RED, BLUE]), "objects": OBJECTS},  # faithful
        {"answer": caption([RED, BLUE]), "prediction": caption([wrong_size, BLUE]), "objects": OBJECTS},
        {"answer": caption([RED, BLUE]), "prediction": "I see shapes.", "objects": OBJECTS},  # names nothing
    ]
    m = caption_metrics(items)
    assert m["n"] == 3 and m["exact_match"] == pytest.approx(1 / 3)
    assert m["hallucination_resp"] == pytest.approx(1 / 3)  # only the wrong-size caption
    assert m["hallucination_ment"] == pytest.approx(1 / 4)  # 1 of 4 mentions
    assert m["hallucination_resp_kind"] == 0.0  # a red circle is in the image: existence-only check passes
    assert m["object_recall"] == pytest.approx(3 / 6)
    assert m["no_mention_rate"] == pytest.approx(1 / 3)


def test_no_mentions_leaves_ment_undefined():
    m = caption_metrics([{"answer": "x", "prediction": "nothing", "objects": OBJECTS}])
    assert m["hallucination_resp"] == 0.0 and m["hallucination_ment"] is None


def test_score_predictions_summary_is_strict_json():
    items = [
        {"id": "a", "task": "vqa", "subtask": "shape", "answer": "circle", "prediction": "circle"},
        {"id": "b", "task": "pope", "subtask": "random", "answer": "no", "prediction": "yes"},
        {"id": "c", "task": "caption", "subtask": "clean", "answer": caption([RED, BLUE]),
         "prediction": caption([RED, BLUE, GHOST]), "objects": OBJECTS},
    ]
    out = score_predictions(items)
    s = out["summary"]
    assert s["vqa_accuracy"] == 1.0 and s["vqa_shape"] == 1.0
    assert s["pope_accuracy"] == 0.0 and s["pope_yes_ratio"] == 1.0 and s["pope_f1_random"] == 0.0
    assert s["hallucination_resp"] == 1.0 and s["hallucination_ment"] == pytest.approx(1 / 3)
    assert out["counts"] == {"caption": 1, "pope": 1, "vqa": 1}
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="preference"):
        score_predictions([{"id": "d", "task": "preference", "answer": "x", "prediction": "y"}])
