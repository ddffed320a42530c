"""`python -m student.eval.lmms_run --model PATH --tasks T1,T2`: lmms-eval in-process with the
mod_distill model (student.eval.lmms); `--shapes-world DIR` adds the local shapes_vqa, shapes_pope and
shapes_caption tasks, which need no download. Needs the `eval` extra (docs/evaluation.md)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import tempfile
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tasks", required=True, help="Comma-separated lmms-eval task names (e.g. pope,gqa or shapes_vqa).")
@click.option("--shapes-world", type=click.Path(exists=True, file_okay=False), default=None,
              help="A shapes-world directory: registers shapes_vqa, shapes_pope, shapes_caption on its test split.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Extra lmms-eval task directory.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--limit", type=float, default=None, help="Documents per task (lmms-eval --limit).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results JSON here.")
@click.option("--predictions", type=click.Path(dir_okay=False), default=None,
              help="Also write every prediction as JSONL (task, doc id, prediction) here.")
def main(model_path, tasks, shapes_world, include_path, batch_size, device, limit, out, predictions):
    """Evaluate a distilled student with lmms-eval."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from student.eval.lmms import ModDistillLlava
    from student.eval.lmms_tasks import write_shapes_tasks

    include = [include_path] if include_path else []
    with tempfile.TemporaryDirectory(prefix="shapes_tasks_") as tmp:
        if shapes_world:
            write_shapes_tasks(shapes_world, tmp)
            include.append(tmp)
        manager = TaskManager(include_path=include or None)
        model = ModDistillLlava(pretrained=model_path, device=device, batch_size=batch_size)
        results = simple_evaluate(model=model, tasks=tasks.split(","), limit=limit, task_manager=manager,
                                  batch_size=batch_size, log_samples=predictions is not None)
    scores = {k: v for k, v in (results or {}).get("results", {}).items()}
    if predictions:
        with open(predictions, "w") as f:
            for task, samples in (results or {}).get("samples", {}).items():
                for s in samples:
                    doc = s.get("doc") or {}
                    f.write(json.dumps({"task": task, "doc_id": s.get("doc_id"), "id": doc.get("id"),
                                        "prediction": (s.get("filtered_resps") or s.get("resps") or [None])[0]},
                                       default=str) + "\n")
    text = json.dumps({"model": str(model_path), "tasks": tasks.split(","), "limit": limit, "results": scores},
                      indent=2, sort_keys=True, default=str)
    if out:
        Path(out).write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.eval.lmms_run")
