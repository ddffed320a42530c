"""Seeds -> mean +- std per arm and metric, the markdown table, and whether a paper's claim holds.

Pure functions: the runner feeds them the summaries of real evaluation files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from student.report.tables import markdown_table

__all__ = ["mean_std", "aggregate", "results_table", "verdict", "LOWER_IS_BETTER"]

LOWER_IS_BETTER = ("hallucination_resp", "hallucination_ment", "hallucination_resp_kind", "hallucination_ment_kind")


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (n - 1), n); std is None below two values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if not n:
        return None, None, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return mean, std, n


def aggregate(rows: Sequence[dict], metrics: Sequence[str]) -> dict[str, dict[str, dict]]:
    """{arm: {metric: {mean, std, n, values}}} from rows {"arm", "seed", "summary": {metric: value}}."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    out: dict[str, dict[str, dict]] = {}
    for arm, rs in arms.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        out[arm] = {}
        for m in metrics:
            values = [r["summary"].get(m) for r in rs]
            mean, std, n = mean_std(values)
            out[arm][m] = {"mean": mean, "std": std, "n": n, "values": values, "seeds": [r["seed"] for r in rs]}
    return out


def _cell(stat: dict | None) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.1f} (n={stat['n']})"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def results_table(arms: Sequence[str], metrics: Sequence[str], agg: dict[str, dict[str, dict]],
                  teacher: dict | None = None) -> str:
    """Rows = arms (in the ablation's order), columns = metrics as percentage mean ± std over seeds;
    the teacher's single evaluation, when given, as a reference row."""
    heads = ["arm", "seeds"] + [m + (" ↓" if m in LOWER_IS_BETTER else " ↑") for m in metrics]
    rows = []
    for arm in arms:
        stats = agg.get(arm, {})
        n = max((s["n"] for s in stats.values()), default=0)
        rows.append([arm, str(n)] + [_cell(stats.get(m)) for m in metrics])
    if teacher is not None:
        rows.append(["teacher (reference)", "1"] + [
            "-" if teacher.get(m) is None else f"{100 * teacher[m]:.1f}" for m in metrics])
    return markdown_table(heads, rows)


def verdict(agg: dict[str, dict[str, dict]], better: str, worse: str, metric: str, lower_is_better: bool) -> dict:
    """Does `better` beat `worse` on `metric` beyond seed noise?

    d = the mean difference in the claimed direction; se = sqrt(s1^2/n1 + s2^2/n2). The claim
    "reproduces" when d > 2 se, is "contradicted" when d < -2 se, and is "within seed noise" otherwise
    (also when either arm has fewer than two seeds, since then there is no noise estimate).
    """
    a, b = agg.get(better, {}).get(metric), agg.get(worse, {}).get(metric)
    if not a or not b or a["mean"] is None or b["mean"] is None:
        return {"claim": f"{better} vs {worse} on {metric}", "result": "not measured"}
    d = (a["mean"] - b["mean"]) * (-1 if lower_is_better else 1) + 0.0  # + 0.0: no "-0.0"
    if a["std"] is None or b["std"] is None:
        result, se = "within seed noise (fewer than 2 seeds)", None
    else:
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        result = "reproduces" if d > 2 * se else "contradicted" if d < -2 * se else "within seed noise"
    return {"claim": f"{better} {'<' if lower_is_better else '>'} {worse} on {metric}", "difference": d,
            "se": se, "result": result}
