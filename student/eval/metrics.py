"""Scores from (prediction, reference) pairs: pure functions, no model.

Every score is a fraction in [0, 1] (reports print percentages). A score that is undefined on the
given data (a mention-level rate over captions that mention nothing) is None, never NaN, so the JSON
stays valid.

- VQA: exact match after `normalize`, per question type.
- POPE: the answer is read as yes/no (`pope_label`); "yes" is the positive class, as in POPE.
- Captions: the Object HalBench analogues. A mention is hallucinated when no object in the image has
  all four of its attributes (size, colour, shape, position): the world's ground truth is exact, so an
  object with a wrong colour or in the wrong cell is an object that is not there. The looser
  existence-only variant (`*_kind`: no object of that colour and shape anywhere) is the closer
  analogue of CHAIR's object-category check.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from actors.shapes.tasks import parse_mentions

__all__ = [
    "normalize",
    "pope_label",
    "vqa_metrics",
    "pope_metrics",
    "pope_confusion_metrics",
    "caption_score",
    "caption_metrics",
    "score_predictions",
    "SUMMARY_KEYS",
]

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[a-z]+")


def normalize(text: str | None) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing full stop."""
    text = _SPACE.sub(" ", (text or "").lower()).strip()
    return text.rstrip(".").strip()


def pope_label(text: str | None) -> tuple[str, bool]:
    """(yes|no, clear). Clear when the answer starts with yes or no; otherwise POPE's own rule
    applies (any "no"/"not" word means no, anything else yes) and the answer counts as unclear."""
    words = _WORD.findall((text or "").lower())
    if words and words[0] in ("yes", "no"):
        return words[0], True
    return ("no" if "no" in words or "not" in words else "yes"), False


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def vqa_metrics(items: Iterable[Mapping]) -> dict:
    """{"overall": {accuracy, correct, n}, <subtask>: {...}} from items with subtask, answer, prediction."""
    correct: Counter = Counter()
    total: Counter = Counter()
    for it in items:
        hit = normalize(it["prediction"]) == normalize(it["answer"])
        for key in ("overall", it.get("subtask") or "unknown"):
            total[key] += 1
            correct[key] += hit
    out = {k: {"accuracy": _ratio(correct[k], total[k]), "correct": correct[k], "n": total[k]} for k in total}
    # Mean over question types: each type counts once however many questions it has.
    kinds = [v["accuracy"] for k, v in out.items() if k != "overall"]
    if kinds:
        out["overall"]["type_mean_accuracy"] = sum(kinds) / len(kinds)
    return out


def pope_confusion_metrics(tp: int, fp: int, tn: int, fn: int, unclear: int = 0) -> dict:
    """POPE's five numbers from a confusion matrix with "yes" as the positive class.

    Precision with no "yes" predictions and F1 with zero precision and recall are 0, as in sklearn's
    zero_division=0; the counts are kept so a reader can tell that case from a real 0.
    """
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _ratio(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": _ratio(tp + fp, n), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "unclear": unclear, "n": n,
    }


def pope_metrics(items: Iterable[Mapping]) -> dict:
    """{"overall": {...}, random|popular|adversarial: {...}} from items with subtask, answer (yes/no), prediction."""
    cells: dict[str, Counter] = {}
    for it in items:
        truth = normalize(it["answer"])
        if truth not in ("yes", "no"):
            raise ValueError(f"record {it.get('id')!r}: POPE answer must be yes or no, got {it['answer']!r}")
        pred, clear = pope_label(it["prediction"])
        cell = {("yes", "yes"): "tp", ("yes", "no"): "fp", ("no", "no"): "tn", ("no", "yes"): "fn"}[(pred, truth)]
        for key in ("overall", it.get("subtask") or "unknown"):
            c = cells.setdefault(key, Counter())
            c[cell] += 1
            c["unclear"] += not clear
    return {k: pope_confusion_metrics(c["tp"], c["fp"], c["tn"], c["fn"], c["unclear"]) for k, c in cells.items()}


def _object_key(o) -> tuple[str, str, str, str]:
    if isinstance(o, Mapping):
        return (o["size"], o["colour"], o["shape"], o["position"])
    return (o.size, o.colour, o.shape, o.position)


def caption_score(prediction: str, objects: Sequence) -> dict:
    """Counts for one caption against the image's objects (dicts or `Obj`s).

    mentions / hallucinated: objects the caption names, and those matching no object in the image;
    hallucinated_kind: those whose colour+shape is nowhere in the image; recalled: image objects named.
    """
    present = {_object_key(o) for o in objects}
    kinds = {(k[1], k[2]) for k in present}
    named = [_object_key(o) for o in parse_mentions(prediction or "")]
    return {
        "mentions": len(named),
        "hallucinated": sum(k not in present for k in named),
        "hallucinated_kind": sum((k[1], k[2]) not in kinds for k in named),
        "recalled": len(present & set(named)),
        "objects": len(present),
    }


def caption_metrics(items: Iterable[Mapping]) -> dict:
    """Caption exact match, object recall, and hallucination at response and mention level.

    hallucination_resp: share of captions with >= 1 hallucinated mention (Object HalBench "Resp");
    hallucination_ment: hallucinated mentions / all mentions (Object HalBench "Ment", CHAIR_i);
    object_recall: image objects named / image objects; no_mention_rate: captions naming no object
    (such a caption cannot hallucinate, so read Resp next to it).
    """
    n = exact = resp = resp_kind = silent = 0
    sums: Counter = Counter()
    for it in items:
        if it.get("objects") is None:
            raise ValueError(f"record {it.get('id')!r}: a caption needs the image's `objects` to score hallucination")
        s = caption_score(it["prediction"], it["objects"])
        n += 1
        exact += normalize(it["prediction"]) == normalize(it["answer"])
        resp += s["hallucinated"] > 0
        resp_kind += s["hallucinated_kind"] > 0
        silent += s["mentions"] == 0
        sums.update(s)
    return {
        "n": n,
        "exact_match": _ratio(exact, n),
        "object_recall": _ratio(sums["recalled"], sums["objects"]),
        "hallucination_resp": _ratio(resp, n),
        "hallucination_ment": _ratio(sums["hallucinated"], sums["mentions"]),
        "hallucination_resp_kind": _ratio(resp_kind, n),
        "hallucination_ment_kind": _ratio(sums["hallucinated_kind"], sums["mentions"]),
        "no_mention_rate": _ratio(silent, n),
        "mentions": sums["mentions"],
        "hallucinated_mentions": sums["hallucinated"],
        "objects": sums["objects"],
        "recalled_objects": sums["recalled"],
    }


# The headline numbers, in the order report tables print them.
SUMMARY_KEYS = (
    "vqa_accuracy", "pope_accuracy", "pope_f1", "pope_yes_ratio",
    "caption_exact_match", "object_recall", "hallucination_resp", "hallucination_ment",
)


def score_predictions(items: Sequence[Mapping]) -> dict:
    """All metrics from scored items (id, task, subtask, answer, prediction, objects), plus a summary."""
    by_task: dict[str, list] = {}
    for it in items:
        by_task.setdefault(it["task"], []).append(it)
    unknown = set(by_task) - {"vqa", "pope", "caption"}
    if unknown:
        raise ValueError(f"score_predictions: no metric for task(s) {sorted(unknown)}; expected vqa, pope, caption")
    vqa = vqa_metrics(by_task.get("vqa", []))
    pope = pope_metrics(by_task.get("pope", []))
    cap = caption_metrics(by_task.get("caption", [])) if "caption" in by_task else {}
    summary = {
        "vqa_accuracy": vqa.get("overall", {}).get("accuracy"),
        "pope_accuracy": pope.get("overall", {}).get("accuracy"),
        "pope_f1": pope.get("overall", {}).get("f1"),
        "pope_yes_ratio": pope.get("overall", {}).get("yes_ratio"),
        "caption_exact_match": cap.get("exact_match"),
        "object_recall": cap.get("object_recall"),
        "hallucination_resp": cap.get("hallucination_resp"),
        "hallucination_ment": cap.get("hallucination_ment"),
    }
    for kind, v in vqa.items():
        if kind != "overall":
            summary[f"vqa_{kind}"] = v["accuracy"]
    for kind, v in pope.items():
        if kind != "overall":
            summary[f"pope_f1_{kind}"] = v["f1"]
    return {"summary": summary, "vqa": vqa, "pope": pope, "caption": cap,
            "counts": {t: len(v) for t, v in sorted(by_task.items())}}
