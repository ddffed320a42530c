"""`python -m student.ablate NAME|all --out DIR`: run the papers' ablations in miniature.

Trains one shared teacher, then every arm for every seed through `python -m student.train`, scores
each arm's final checkpoint with student.eval, and writes OUT/<name>.md with mean +- std over seeds
and whether each of the paper's claims reproduces. `--dry-run` prints the plan and runs nothing.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from pathlib import Path

import click

from student.ablate.arms import ABLATIONS, get_ablation
from student.ablate.run import DEFAULT_RECIPE, AblationConfig, execute, plan, shell_command, write_results


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--seeds") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", type=click.Choice([*sorted(ABLATIONS), "all"]))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Ablation directory (resumable).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Student seeds, comma-separated.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Steps per student stage, every arm.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=None, help="Steps of the shared teacher.")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False), default=None,
              help="An existing teacher checkpoint (skips training one); its world must be the recipe's.")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_RECIPE), show_default=True)
@click.option("--workers", default="1", show_default=True, help="Ray Train workers per stage (student.train --workers).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N test records.")
@click.option("--dry-run", is_flag=True, help="Print the plan; run nothing.")
@click.option("--report-only", is_flag=True, help="Only rebuild OUT/<name>.md from finished evaluations.")
def main(name, out, seeds, max_steps, teacher_steps, teacher, recipe, workers, eval_limit, dry_run, report_only):
    """LLaVA-MoD Tables 5-8 and LLaVA-KD Table 2 in miniature, mean +- std over seeds."""
    cfg = AblationConfig(out=Path(out), seeds=_seeds(seeds), max_steps=max_steps, teacher_steps=teacher_steps,
                         recipe=Path(recipe), teacher=Path(teacher) if teacher else None, workers=workers,
                         eval_limit=eval_limit)
    command = "python -m student.ablate " + shell_command(sys.argv[1:])
    for ablation in (ABLATIONS.values() if name == "all" else [get_ablation(name)]):
        if dry_run:
            click.echo(f"# {ablation.paper}: {ablation.name}")
            for step in plan(ablation, cfg):
                status = "done" if step.done() else "todo"
                what = shell_command(step.argv) if step.argv else f"{step.kind} {step.stage} in {step.run_dir}"
                click.echo(f"[{status}] {step.arm or 'teacher'} seed{step.seed}: {what}")
            continue
        if not report_only:
            execute(ablation, cfg, echo=click.echo)
        click.echo(f"results: {write_results(ablation, cfg, command)}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="python -m student.ablate")
