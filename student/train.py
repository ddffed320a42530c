"""`python -m student.train [--stage STAGE]`: the product's main job.

With no arguments it runs the embedded default: the shapes world (datasets/shapes.yaml) through the
whole LLaVA-MoD pipeline on a local Ray. It prepares the run directory (resolved config, the
generated world with its tokenizer and contact sheet, `models.json` with the preset's sizes), then
trains the stages one after another on Ray Train + DeepSpeed (`student.training`), each reading the
previous stage's checkpoint from the run directory, and exports the final student to RUN/student/.
Under `ray job submit` (RAY_ADDRESS set) it joins that cluster; otherwise it starts a local Ray.
Training rows come from the data plane (actors), or with `--data DIR` from already-annotated Parquet.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads starve Ray workers

import sys
import time
from pathlib import Path

import click

from actors.recipe import STAGES, load_recipe
from student.run_dir import new_run_name, write_json, write_resolved_config

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "datasets" / "shapes.yaml"
PIPELINES = {"llava-mod": ("teacher", "init", "d2d", "d2s", "preference"), "llava-kd": ("dpt", "sft", "dft")}


def prepare_world(recipe, run_dir: Path) -> Path:
    """Generate the shapes world the recipe describes into the run directory (once)."""
    from actors.shapes.contact_sheet import write_contact_sheet
    from actors.shapes.generate import GenerateConfig, generate_world
    from actors.shapes.world import WorldConfig

    world_dir = run_dir / "world"
    if (world_dir / "manifest.json").exists():
        return world_dir
    w = recipe.world
    generate_world(world_dir, GenerateConfig(size=w.size, seed=w.seed, noisy_rate=w.noisy_rate,
                                             chat_turns=w.chat_turns),
                   WorldConfig(image_size=w.image_size, patch_size=w.patch_size))
    write_contact_sheet(world_dir, world_dir / "contact_sheet.png", count=16)
    return world_dir


def describe_models(recipe, tokenizer) -> dict:
    """Build the preset's teacher, dense student and upcycled student; report their sizes."""
    from student.model import build_student, build_teacher, get_preset, parameter_report, upcycle

    preset = get_preset(recipe.model.preset)
    teacher = build_teacher(preset, tokenizer, seed=recipe.seed)
    dense = build_student(preset, tokenizer, seed=recipe.seed)
    moe = upcycle(dense, recipe.model.num_experts, recipe.model.top_k, layers=recipe.model.moe_layers,
                  seed=recipe.seed)
    return {name: parameter_report(m) for name, m in
            (("teacher", teacher), ("student_dense", dense), ("student_moe", moe))}


def stage_list(stage: str, pipeline: str, recipe, run: Path) -> tuple[str, ...]:
    """The stages to run: one, or the pipeline (without `teacher` when a teacher is given or trained)."""
    if stage != "all":
        return (stage,)
    stages = PIPELINES[pipeline]
    if "teacher" in stages and (recipe.model.teacher or (run / "teacher" / "config.json").exists()):
        stages = tuple(s for s in stages if s != "teacher")
    return stages


def make_data_fn(data: str | None, teacher: str | None, teacher_cache: Path):
    """(recipe, stage, run_dir) -> (dataset, rows): --data DIR[/<stage>] Parquet, else the data plane."""
    from student.training.data import annotated_parquet, stage_dataset

    def data_fn(recipe, stage, run_dir):
        if data is not None:
            root = Path(data)
            return annotated_parquet(root / stage if (root / stage).is_dir() else root)
        return stage_dataset(recipe, stage, run_dir, teacher=teacher, teacher_cache=teacher_cache)

    return data_fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", type=click.Choice([*STAGES, "all"]), default="all", show_default=True)
@click.option("--pipeline", type=click.Choice(sorted(PIPELINES)), default="llava-mod", show_default=True,
              help="Stages that --stage all runs.")
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_RECIPE),
              show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Existing run directory to continue, or where to create one (default runs/<unique name>).")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
@click.option("--workers", default="2", show_default=True, help="Ray Train workers: N, or MIN:MAX (elastic).")
@click.option("--resize-interval", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Elastic runs (--workers MIN:MAX): seconds between Ray Train's checks for room for more workers.")
@click.option("--placement", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
              help="Ask for the student_gpu pool: auto (when the cluster has it), require (wait for it), off.")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=2, show_default=True, help="DeepSpeed ZeRO stage.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps per stage (overrides epochs).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Checkpoint every N steps (0: only at the end of each stage).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --run-dir from its last checkpoints.")
@click.option("--max-failures", type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker-group restarts from the last checkpoint before a stage fails.")
@click.option("--teacher", default=None, help="Teacher: a Serve app NAME (shared endpoint) or a checkpoint PATH.")
@click.option("--teacher-cache", type=click.Path(file_okay=False), default=None,
              help="Teacher-output cache directory (default RUN/teacher_cache).")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Already-annotated rows (actors.columns) as Parquet: DIR/<stage>/ or DIR; skips the data plane.")
@click.option("--gpu", is_flag=True, help="Train on GPUs (bf16); default CPU (fp32).")
@click.option("--no-progress", is_flag=True, help="No tqdm bars (metrics still go to RUN/metrics.jsonl).")
@click.option("--no-eval", is_flag=True, help="Skip the evaluation after each stage and the run report.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=900, show_default=True,
              help="Test records per evaluation (the shapes world's test split).")
@click.option("--prepare-only", is_flag=True, help="Prepare the run directory (config, world, models.json) and stop.")
def main(stage, pipeline, recipe_path, run_dir, seed, workers, resize_interval, placement, zero_stage, max_steps,
         checkpoint_every, resume, max_failures, teacher, teacher_cache, data, gpu, no_progress, no_eval, eval_limit,
         prepare_only):
    """Distil a multimodal teacher into a sparse-MoE student, stage by stage."""
    from student.training.data import DataPlaneUnavailable
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.trainer import ensure_ray, parse_workers
    from teacher_service.identity import TokenizerHashMismatch

    start = time.perf_counter()
    recipe = load_recipe(recipe_path)
    if seed is not None:
        recipe = type(recipe)(**{**recipe.__dict__, "seed": seed})
    if teacher is not None:
        recipe = type(recipe)(**{**recipe.__dict__, "model": type(recipe.model)(**{**recipe.model.__dict__, "teacher": teacher})})
    try:
        worker_spec = parse_workers(workers)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--workers") from None
    if resume and not run_dir:
        raise click.UsageError("--resume needs --run-dir (the run to continue)")
    run = Path(run_dir) if run_dir else Path("runs") / new_run_name(recipe)
    stages = stage_list(stage, pipeline, recipe, run)
    missing = [s for s in stages if s not in recipe.stages]
    if missing:
        raise click.UsageError(f"recipe {recipe.name!r} has no stage(s) {missing}; it has {list(recipe.stages)}")
    flags = {"stage": stage, "pipeline": pipeline, "recipe": recipe_path, "workers": workers,
             "resize_interval": resize_interval, "placement": placement, "zero_stage": zero_stage,
             "max_steps": max_steps, "checkpoint_every": checkpoint_every, "resume": resume, "teacher": teacher,
             "teacher_cache": teacher_cache, "data": data}
    config = write_resolved_config(run, recipe, flags)
    click.echo(f"run directory: {run} (resolved config: {config})")
    if recipe.world is not None:
        world = prepare_world(recipe, run)
        click.echo(f"shapes world: {world} (contact sheet: {world / 'contact_sheet.png'})")
        if not (run / "models.json").exists():
            from actors.shapes.tokenizer import load_tokenizer

            models = describe_models(recipe, load_tokenizer(world / "tokenizer"))
            write_json(run / "models.json", models)
            for name, rep in models.items():
                click.echo(f"  {name:<14} total {rep['total']:>10,}  active {rep['active']:>10,}  "
                           f"experts {rep['num_experts']}x top-{rep['top_k']} on layers {rep['moe_layers']}")
    if prepare_only:
        click.echo(f"prepared in {time.perf_counter() - start:.1f}s (--prepare-only)")
        return
    address = ensure_ray()
    click.echo(f"ray: {address}; stages: {' -> '.join(stages)}")
    options = TrainOptions(workers=worker_spec, zero_stage=zero_stage, max_steps=max_steps,
                           checkpoint_every=checkpoint_every, resume=resume, max_failures=max_failures,
                           use_gpu=gpu, progress=not no_progress, evaluate=not no_eval, eval_limit=eval_limit,
                           placement=placement, resize_interval_s=resize_interval)
    cache = Path(teacher_cache) if teacher_cache else run / "teacher_cache"
    try:
        run_stages(stages, run, recipe, make_data_fn(data, teacher, cache), options, echo=click.echo)
    except DataPlaneUnavailable as e:
        click.echo(f"error: training data is not available yet: {e}", err=True)
        click.echo(f"prepared in {time.perf_counter() - start:.1f}s", err=True)
        sys.exit(3)
    except TokenizerHashMismatch as e:  # refused before any training step
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(f"done in {time.perf_counter() - start:.1f}s; metrics: {run / 'metrics.jsonl'}, TensorBoard: {run / 'tb'}")
    if (run / "report.md").exists():
        click.echo(f"report: {run / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.train")
