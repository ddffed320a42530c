"""Read a run directory's training metrics (RUN/metrics.jsonl) and evaluation results (RUN/eval/*.json)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from actors.recipe import STAGES

__all__ = ["Metrics", "read_metrics", "read_evals", "stage_order", "router_keys"]

_ROUTER = re.compile(r"^router/layer(\d+)/expert(\d+)$")


@dataclass
class Metrics:
    records: list[dict]  # one per (stage, step), the last logged wins
    skipped_lines: int = 0  # malformed lines, counted and reported rather than fatal
    duplicates: int = 0  # steps logged again after a resume
    problems: list[str] = field(default_factory=list)

    def stages(self) -> list[str]:
        return stage_order({r["stage"] for r in self.records})

    def of(self, stage: str) -> list[dict]:
        return [r for r in self.records if r["stage"] == stage]


def stage_order(names) -> list[str]:
    """Pipeline order (actors.recipe.STAGES), unknown names last in alphabetical order."""
    known = [s for s in STAGES if s in names]
    return known + sorted(set(names) - set(STAGES))


def read_metrics(path: str | Path) -> Metrics:
    """RUN/metrics.jsonl as records sorted by pipeline stage then step.

    A resumed stage logs again the steps after its last checkpoint; the later record replaces the
    earlier one. A line that is not a JSON object with "stage" and an integer "step" is skipped and
    counted, with the first few named in `problems`.
    """
    path = Path(path)
    if not path.exists():
        return Metrics(records=[], problems=[f"{path}: not found"])
    by_key: dict[tuple[str, int], dict] = {}
    skipped = duplicates = 0
    problems: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = (str(rec["stage"]), int(rec["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            skipped += 1
            if len(problems) < 5:
                problems.append(f"{path.name}:{n}: skipped ({type(e).__name__}: {e})")
            continue
        duplicates += key in by_key
        by_key[key] = rec
    order = {s: i for i, s in enumerate(stage_order({k[0] for k in by_key}))}
    records = [by_key[k] for k in sorted(by_key, key=lambda k: (order[k[0]], k[1]))]
    return Metrics(records=records, skipped_lines=skipped, duplicates=duplicates, problems=problems)


def router_keys(records: list[dict]) -> dict[int, list[tuple[int, str]]]:
    """{layer: [(expert, key), ...]} for the router/layer{L}/expert{E} keys present, sorted."""
    layers: dict[int, list[tuple[int, str]]] = {}
    for key in sorted({k for r in records for k in r}):
        m = _ROUTER.match(key)
        if m:
            layers.setdefault(int(m[1]), []).append((int(m[2]), key))
    return {L: sorted(v) for L, v in sorted(layers.items())}


def read_evals(run_dir: str | Path) -> tuple[dict[tuple[str, str], dict], list[str]]:
    """({(stage, who): result}, problems) from RUN/eval/<stage>_<who>.json."""
    out: dict[tuple[str, str], dict] = {}
    problems: list[str] = []
    for f in sorted((Path(run_dir) / "eval").glob("*.json")):
        stage, sep, who = f.stem.rpartition("_")
        if not sep:
            problems.append(f"{f.name}: skipped (expected <stage>_<who>.json)")
            continue
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{f.name}: skipped (not JSON: {e})")
            continue
        if not isinstance(data, dict) or "summary" not in data:
            problems.append(f"{f.name}: skipped (no 'summary'; not a student.eval result)")
            continue
        out[(stage, who)] = data
    return out, problems
