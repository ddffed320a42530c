"""Markdown tables of a run: pure functions from metrics records and evaluation results to text.

The evaluation tables follow LLaVA-MoD's layout: comprehension (its Table 2), hallucination (Table 3;
Table 5 is the same table read across the d2s and preference rows), and the student-minus-teacher
difference after each stage. Scores are percentages with one decimal; "-" is a score the evaluation
could not define (e.g. mention-level hallucination when no caption named an object).
"""
from __future__ import annotations

import math

from actors.shapes.tasks import POPE_KINDS, VQA_KINDS
from student.report.load import router_keys, stage_order

__all__ = [
    "markdown_table",
    "pct",
    "stage_summary_table",
    "expert_load_table",
    "comprehension_table",
    "hallucination_table",
    "teacher_gap_table",
    "eval_rows",
    "teacher_for",
]


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x, fmt: str = "{:.4g}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _mean(xs) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _window(records: list[dict], key: str, last: bool) -> float | None:
    """Mean of `key` over the first or last 10% of the records that have it (at least one record)."""
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    k = max(1, len(vals) // 10)
    return _mean(vals[-k:] if last else vals[:k])


def stage_summary_table(stages: list[str], by_stage: dict[str, list[dict]]) -> str:
    rows = []
    for s in stages:
        recs = by_stage[s]
        times = [r.get("time_s") for r in recs]
        rows.append([
            s, str(len(recs)), _num(_window(recs, "loss/total", last=False)), _num(_window(recs, "loss/total", last=True)),
            _num(_mean(times), "{:.3f}"), _num(_mean([r.get("tokens_per_s") for r in recs]), "{:.0f}"),
            _num(_mean([r.get("teacher_wait_s") for r in recs]), "{:.3f}"),
        ])
    return markdown_table(["stage", "steps", "loss first 10%", "loss last 10%", "s/step", "tokens/s",
                           "teacher wait s/step"], rows)


def expert_load_table(records: list[dict]) -> str | None:
    """Per MoE layer: each expert's mean token fraction over the last 10% of steps, the max/min ratio
    (1.0 is perfectly even) and the router entropy when logged."""
    layers = router_keys(records)
    if not layers:
        return None
    width = max(len(v) for v in layers.values())
    rows = []
    for layer, experts in layers.items():
        loads = [_window(records, key, last=True) for _, key in experts]
        vals = [v for v in loads if v is not None]
        ratio = max(vals) / min(vals) if vals and min(vals) > 0 else None
        rows.append([str(layer)] + [_num(v, "{:.3f}") for v in loads] + ["-"] * (width - len(loads))
                    + [_num(ratio, "{:.2f}"), _num(_window(records, f"router/layer{layer}/entropy", last=True), "{:.3f}")])
    return markdown_table(["layer"] + [f"expert {e}" for e in range(width)] + ["max/min", "entropy"], rows)


def eval_rows(evals: dict[tuple[str, str], dict]) -> list[tuple[str, str, dict]]:
    """(stage, who, result) in pipeline order, teacher before student within a stage."""
    who_order = {"teacher": 0, "student": 1}
    stages = stage_order({s for s, _ in evals})
    return [(s, w, evals[(s, w)]) for s in stages
            for w in sorted((w for st, w in evals if st == s), key=lambda w: (who_order.get(w, 2), w))]


def _params(res: dict) -> str:
    p = res.get("parameters") or {}
    if "total" not in p:
        return "-"
    moe = f" E{p['num_experts']}T{p['top_k']}" if p.get("num_experts") else ""
    return f"{p['active'] / 1e6:.2f}M / {p['total'] / 1e6:.2f}M{moe}"


def comprehension_table(evals: dict[tuple[str, str], dict]) -> str:
    """VQA exact match per question type, their mean, POPE accuracy and caption exact match (all up)."""
    rows = []
    for stage, who, res in eval_rows(evals):
        s = res["summary"]
        vqa = res.get("vqa", {})
        rows.append([stage, who, _params(res)] + [pct(vqa.get(k, {}).get("accuracy")) for k in VQA_KINDS]
                    + [pct(s.get("vqa_accuracy")), pct(s.get("pope_accuracy")), pct(s.get("caption_exact_match"))])
    return markdown_table(["stage", "model", "active / total params"] + list(VQA_KINDS)
                          + ["VQA all ↑", "POPE acc ↑", "caption EM ↑"], rows)


def hallucination_table(evals: dict[tuple[str, str], dict]) -> str:
    """Caption hallucination (Resp, Ment: down), POPE F1 per negative type (up), yes-ratio, recall."""
    rows = []
    for stage, who, res in eval_rows(evals):
        s, cap, pope = res["summary"], res.get("caption", {}), res.get("pope", {})
        rows.append([stage, who, pct(s.get("hallucination_resp")), pct(s.get("hallucination_ment")),
                     pct(cap.get("hallucination_resp_kind"))]
                    + [pct(pope.get(k, {}).get("f1")) for k in POPE_KINDS]
                    + [pct(s.get("pope_f1")), pct(s.get("pope_yes_ratio")), pct(s.get("object_recall"))])
    return markdown_table(["stage", "model", "Resp ↓", "Ment ↓", "Resp (absent kind) ↓"]
                          + [f"POPE F1 {k} ↑" for k in POPE_KINDS] + ["POPE F1 ↑", "yes-ratio", "object recall ↑"], rows)


GAP_KEYS = (("vqa_accuracy", "VQA"), ("pope_f1", "POPE F1"), ("caption_exact_match", "caption EM"),
            ("object_recall", "recall"), ("hallucination_resp", "Resp"), ("hallucination_ment", "Ment"))


def teacher_for(stage: str, evals: dict[tuple[str, str], dict]) -> dict | None:
    """The teacher's result for `stage`: evaluated after that stage, else once after its own stage."""
    return evals.get((stage, "teacher")) or evals.get(("teacher", "teacher"))


def teacher_gap_table(evals: dict[tuple[str, str], dict]) -> str | None:
    """Student minus teacher in percentage points after each stage (Resp/Ment: negative is better)."""
    rows = []
    for stage, who, res in eval_rows(evals):
        teacher = teacher_for(stage, evals)
        if who != "student" or teacher is None:
            continue
        cells = []
        for key, _ in GAP_KEYS:
            a, b = res["summary"].get(key), teacher["summary"].get(key)
            cells.append("-" if a is None or b is None else f"{100 * (a - b):+.1f}")
        rows.append([stage] + cells)
    if not rows:
        return None
    return markdown_table(["stage"] + [f"Δ {name}" for _, name in GAP_KEYS], rows)
