"""Stage chaining: run stages in order through the run directory, then export the final student.

Each stage reads its predecessor's RUN/stages/<prev>/hf (see `stage_model`), trains under its own Ray
Train run name and writes its own HF checkpoint; after the last stage of a pipeline (preference for
LLaVA-MoD, dft for LLaVA-KD) the student is exported to RUN/student/.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from actors.recipe import Recipe
from student.training.job import StageJob
from student.training.metrics import format_summary
from student.training.stage_model import check_student_tokenizer, stage_output_dir
from student.training.trainer import RESIZE_INTERVAL_S, Workers, run_stage

__all__ = ["FINAL_STAGES", "PIPELINES", "TrainOptions", "export_student", "run_stages"]

PIPELINES = {"llava-mod": ("teacher", "init", "d2d", "d2s", "preference"), "llava-kd": ("dpt", "sft", "dft")}
FINAL_STAGES = ("preference", "dft")


@dataclass(frozen=True)
class TrainOptions:
    workers: Workers = field(default_factory=lambda: Workers(2, 2))
    zero_stage: int = 2
    max_steps: int | None = None
    checkpoint_every: int = 50
    resume: bool = False
    max_failures: int = 1
    use_gpu: bool = False
    progress: bool = True
    evaluate: bool = False  # evaluate after every stage (RUN/eval/) and write RUN/report.md at the end
    eval_limit: int | None = 900  # test records per evaluation (900 = 100 images, every task type)
    placement: str = "auto"  # the student_gpu pool: auto (when the cluster has it), require, off
    resize_interval_s: float = RESIZE_INTERVAL_S  # elastic runs: how often Ray Train looks for more room


def export_student(run_dir: Path, stage: str) -> Path:
    """RUN/student/ from the stage's HF checkpoint, through student.model.export (adds parameters.json)."""
    from transformers import AutoProcessor

    from student.model import export, load_model

    src = stage_output_dir(run_dir, stage)
    model = load_model(src)
    processor = AutoProcessor.from_pretrained(str(src), local_files_only=True)
    return export(model, processor, Path(run_dir) / "student")


# (recipe, stage, run_dir) -> (Ray Dataset of annotated rows, rows per epoch), or an actors.pipeline.StageData
# (which unpacks to the same pair and carries the pass ledger)
DataFn = Callable[[Recipe, str, Path], tuple]


def check_stage_losses(stages, recipe: Recipe) -> None:
    """Fail before any Ray work when a stage to run has every loss term weighted 0 (nothing to train)."""
    from student.losses import active_terms
    from student.training.step import loss_weights

    for stage in stages:
        try:
            if stage in recipe.stages:  # a stage the recipe lacks fails later with its own message
                active_terms(stage, loss_weights(recipe.stages[stage].loss))
        except ValueError as e:
            raise ValueError(f"recipe stage {stage!r}: {e}") from None


def run_stages(stages, run_dir: Path, recipe: Recipe, data_fn: DataFn, options: TrainOptions = TrainOptions(),
               echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Train `stages` in order; returns {stage: summary}. A stage already finished in this run
    directory (its run.json says so and its checkpoint exists) is skipped when resuming."""
    import ray.data

    check_stage_losses(stages, recipe)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per stage is ours
    run_dir = Path(run_dir).resolve()
    summaries = {}
    for stage in stages:
        record = run_dir / "stages" / stage / "run.json"
        done = record.exists() and json.loads(record.read_text()).get("status") == "finished"
        if options.resume and done and (stage_output_dir(run_dir, stage) / "config.json").exists():
            echo(f"stage {stage}: already finished in {run_dir}, skipped (--resume)")
            continue
        if stage == "teacher" and recipe.world is not None:  # the embedded world: pretrain the vision tower first
            from student.training.teacher_init import prepare_teacher_init

            prepare_teacher_init(run_dir, recipe, echo=echo)
        data = data_fn(recipe, stage, run_dir)
        dataset, rows = data
        ledger = getattr(data, "ledger", None)  # actors.pipeline.StageData: the pass ledger
        key = getattr(data, "key", None)  # who annotated the rows (the data plane checked it against its tokenizer)
        if key is not None:
            check_student_tokenizer(stage, run_dir, recipe, key.tokenizer_hash)
        job = StageJob(stage=stage, run_dir=str(run_dir), recipe=recipe, rows=rows, zero_stage=options.zero_stage,
                       max_steps=options.max_steps, checkpoint_every=options.checkpoint_every,
                       use_gpu=options.use_gpu, progress=options.progress)
        echo(f"stage {stage}: {rows} rows per epoch, {options.workers.min}"
             f"{'' if not options.workers.elastic else f'-{options.workers.max}'} workers, ZeRO-{options.zero_stage}")
        t0 = time.time()
        run_stage(job, dataset, workers=options.workers, max_failures=options.max_failures, resume=options.resume,
                  ledger=ledger, placement=options.placement, resize_interval_s=options.resize_interval_s)
        summary_path = run_dir / "stages" / stage / "summary.json"
        summaries[stage] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summaries[stage]["fit_s"] = time.time() - t0
        if "entered_at" in summaries[stage]:  # Ray Train's own overheads around the worker loop
            summaries[stage]["start_overhead_s"] = summaries[stage]["entered_at"] - t0
            summaries[stage]["end_overhead_s"] = time.time() - summaries[stage]["finished_at"]
        echo(format_summary(stage, summaries[stage]))
        echo(f"stage {stage}: checkpoint {stage_output_dir(run_dir, stage)}")
        if stage in FINAL_STAGES:
            echo(f"final student: {export_student(run_dir, stage)}")
        if options.evaluate and recipe.world is not None:
            evaluate_after(run_dir, recipe, stage, options, echo)
    if options.evaluate and summaries:
        from student.report import build_report

        echo(f"report: {build_report(run_dir)}")
    return summaries


def evaluate_after(run_dir: Path, recipe: Recipe, stage: str, options: TrainOptions, echo=print) -> None:
    """Score the stage's model on the world's test split (and the teacher once), as the report's tables need."""
    from student.eval.evaluate import evaluate_stage
    from student.training.stage_model import teacher_dir

    jobs = []
    tdir = teacher_dir(run_dir, recipe)
    if not (run_dir / "eval" / "teacher_teacher.json").exists() and (tdir / "config.json").exists():
        jobs.append(("teacher", "teacher", tdir))
    if stage != "teacher":
        jobs.append((stage, "student", stage_output_dir(run_dir, stage)))
    for st, who, path in jobs:
        out = evaluate_stage(run_dir, st, who, model_path=path, limit=options.eval_limit, progress=options.progress)
        echo(f"eval {who} after {st}: {out}")
