"""`python -m student.train [--stage STAGE]`: the product's main job.

With no arguments it runs the embedded default: the shapes world (datasets/shapes.yaml) through the
whole LLaVA-MoD pipeline on a local Ray. What runs today: the run directory with its resolved config,
the generated world, its tokenizer and a contact sheet, and the teacher and student models of the
recipe's preset with their parameter counts (`models.json`). The training stages land with the Ray
Train work; asking for one before then is a clear error, not a silent no-op.
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
IMPLEMENTED_STAGES: tuple[str, ...] = ()


def prepare_world(recipe, run_dir: Path) -> Path:
    """Generate the shapes world the recipe describes into the run directory (once)."""
    from actors.shapes.contact_sheet import write_contact_sheet
    from actors.shapes.generate import GenerateConfig, generate_world
    from actors.shapes.world import WorldConfig

    world_dir = run_dir / "world"
    if (world_dir / "manifest.json").exists():
        return world_dir
    w = recipe.world
    generate_world(world_dir, GenerateConfig(size=w.size, seed=w.seed, noisy_rate=w.noisy_rate),
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--stage", type=click.Choice([*STAGES, "all"]), default="all", show_default=True)
@click.option("--pipeline", type=click.Choice(sorted(PIPELINES)), default="llava-mod", show_default=True,
              help="Stages that --stage all runs.")
@click.option("--recipe", "recipe_path", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_RECIPE),
              show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Existing run directory to continue, or where to create one (default runs/<unique name>).")
@click.option("--seed", type=int, default=None, help="Override the recipe's seed.")
def main(stage, pipeline, recipe_path, run_dir, seed):
    """Distil a multimodal teacher into a sparse-MoE student, stage by stage."""
    start = time.perf_counter()
    recipe = load_recipe(recipe_path)
    if seed is not None:
        recipe = type(recipe)(**{**recipe.__dict__, "seed": seed})
    stages = PIPELINES[pipeline] if stage == "all" else (stage,)
    missing = [s for s in stages if s not in recipe.stages]
    if missing:
        raise click.UsageError(f"recipe {recipe.name!r} has no stage(s) {missing}; it has {list(recipe.stages)}")
    run = Path(run_dir) if run_dir else Path("runs") / new_run_name(recipe)
    config = write_resolved_config(run, recipe, {"stage": stage, "pipeline": pipeline, "recipe": recipe_path})
    click.echo(f"run directory: {run} (resolved config: {config})")
    if recipe.world is not None:
        world = prepare_world(recipe, run)
        click.echo(f"shapes world: {world} (contact sheet: {world / 'contact_sheet.png'})")
        from actors.shapes.tokenizer import load_tokenizer

        models = describe_models(recipe, load_tokenizer(world / "tokenizer"))
        write_json(run / "models.json", models)
        for name, rep in models.items():
            click.echo(f"  {name:<14} total {rep['total']:>10,}  active {rep['active']:>10,}  "
                       f"experts {rep['num_experts']}x top-{rep['top_k']} on layers {rep['moe_layers']}")
    pending = [s for s in stages if s not in IMPLEMENTED_STAGES]
    if pending:
        click.echo(f"error: training stage(s) {pending} are not available yet in this version "
                   "(Ray Train + DeepSpeed training is being built; see the issue tracker).", err=True)
        click.echo(f"prepared in {time.perf_counter() - start:.1f}s", err=True)
        sys.exit(3)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.train")
