"""RUN/report.md + RUN/plots/*.png from what a run left in its directory.

Reads RUN/metrics.jsonl (training steps) and RUN/eval/<stage>_<who>.json (student.eval results); a
missing piece becomes a line in the report saying so, never a crash, so a run can be reported while
it is still going.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from student.report.load import read_evals, read_metrics
from student.report.plots import plot_expert_load, plot_stage_losses, plot_total_loss
from student.report.tables import (
    comprehension_table,
    expert_load_table,
    hallucination_table,
    stage_summary_table,
    teacher_gap_table,
)

__all__ = ["build_report"]


def _models_line(run_dir: Path) -> str | None:
    path = run_dir / "models.json"
    if not path.exists():
        return None
    try:
        models = json.loads(path.read_text())
        return "; ".join(f"{name}: {rep['active'] / 1e6:.2f}M active / {rep['total'] / 1e6:.2f}M total"
                         for name, rep in models.items())
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def build_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/plots/*.png; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    plots = run_dir / "plots"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    evals, eval_problems = read_evals(run_dir)
    stages = metrics.stages()
    by_stage = {s: metrics.of(s) for s in stages}

    md = [f"# Run report: {run_dir.name}", "",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m student.report {run_dir}`.", ""]
    models = _models_line(run_dir)
    if models:
        md += [f"Models: {models}.", ""]

    md += ["## Evaluation", ""]
    if evals:
        md += ["Shapes-world test split, greedy decoding (`student.eval`). Percentages.", "",
               "### Comprehension (LLaVA-MoD Table 2 analogue)", "", comprehension_table(evals), "",
               "### Hallucination (LLaVA-MoD Tables 3 and 5 analogue)", "",
               "Resp: captions naming at least one object not in the image (Object HalBench response level); "
               "Ment: named objects not in the image (mention level); absent kind: no object of that colour "
               "and shape anywhere in the image.", "", hallucination_table(evals), ""]
        gap = teacher_gap_table(evals)
        if gap:
            md += ["### Student minus teacher (percentage points)", "", gap, ""]
    else:
        md += [f"No evaluation results in {run_dir / 'eval'} yet.", ""]
    md += [f"- {p}" for p in eval_problems] + ([""] if eval_problems else [])

    md += ["## Training", ""]
    if stages:
        md += [stage_summary_table(stages, by_stage), ""]
        total = plot_total_loss(stages, by_stage, plots / "loss_total.png")
        if total:
            md += [f"![total loss]({total.relative_to(run_dir)})", ""]
        for s in stages:
            md += [f"### {s}", ""]
            loss = plot_stage_losses(s, by_stage[s], plots / f"loss_{s}.png")
            if loss:
                md += [f"![{s} losses]({loss.relative_to(run_dir)})", ""]
            table = expert_load_table(by_stage[s])
            if table:
                load = plot_expert_load(s, by_stage[s], plots / f"experts_{s}.png")
                md += ["Expert load (token fraction, mean of the last 10% of steps):", "", table, "",
                       f"![{s} expert load]({load.relative_to(run_dir)})", ""]
    else:
        md += [f"No training metrics in {run_dir / 'metrics.jsonl'} yet.", ""]
    if metrics.skipped_lines or metrics.duplicates:
        md += [f"metrics.jsonl: {metrics.skipped_lines} malformed line(s) skipped, {metrics.duplicates} step(s) "
               "logged again after a resume (the later record kept).", ""]
    md += [f"- {p}" for p in metrics.problems if "not found" not in p]

    out = run_dir / "report.md"
    out.write_text("\n".join(md).rstrip() + "\n")
    return out
