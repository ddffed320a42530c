"""Plan and run an ablation: one shared teacher, then every arm x seed through `student.train`,
then `student.eval` on each arm's last stage, then the mean +- std table.

Layout under OUT:
    OUT/teacher/                      the shared teacher run (world, RUN/teacher, its evaluation)
    OUT/runs/<recipe-hash>/seed<k>/   one student run per resolved recipe and seed: arms that resolve
                                      to the same recipe (e.g. "mimic" and "mimic+preference", or the
                                      default arm of several ablations) share it and its finished stages
    OUT/<ablation>.md, .json          the table, the claims' verdicts and the command that produced them

Every step is skipped when its output exists, so an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from actors.recipe import Recipe, load_recipe, recipe_dict
from student.ablate.aggregate import LOWER_IS_BETTER, aggregate, results_table, verdict
from student.ablate.arms import Ablation, Arm, arm_recipe

__all__ = ["AblationConfig", "Step", "plan", "execute", "collect", "write_results", "DEFAULT_RECIPE"]

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "datasets" / "shapes.yaml"


@dataclass(frozen=True)
class AblationConfig:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)
    max_steps: int | None = None  # per student stage, the same in every arm
    teacher_steps: int | None = None  # the shared teacher (None: the recipe's epochs)
    recipe: Path = DEFAULT_RECIPE
    teacher: Path | None = None  # an existing teacher checkpoint; None: train one under OUT/teacher
    workers: str = "1"
    eval_limit: int | None = None
    python: str = sys.executable

    def __post_init__(self) -> None:
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")


@dataclass(frozen=True)
class Step:
    kind: str  # "teacher" | "train" | "skip" | "eval"
    run_dir: Path
    stage: str
    arm: str = ""
    seed: int = 0
    argv: tuple[str, ...] = ()
    data_dir: Path | None = None  # eval: the world to score on (default RUN/world)

    def done(self) -> bool:
        if self.kind == "eval":
            return (self.run_dir / "eval" / f"{self.stage}_{'teacher' if self.arm == '' else 'student'}.json").exists()
        out = self.run_dir / ("teacher" if self.kind == "teacher" else f"stages/{self.stage}/hf")
        return (out / "config.json").exists()


def recipe_key(recipe: Recipe, arm: Arm, max_steps: int | None) -> str:
    """Runs that would train identically share a directory: same resolved recipe, skips and steps."""
    data = {"recipe": {**recipe_dict(recipe), "seed": None}, "skip": list(arm.skip), "max_steps": max_steps}
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def _train_argv(cfg: AblationConfig, stage: str, run: Path, recipe_path: Path, teacher: Path | None,
                max_steps: int | None) -> tuple[str, ...]:
    argv = [cfg.python, "-m", "student.train", "--stage", stage, "--recipe", str(recipe_path), "--run-dir", str(run),
            "--workers", cfg.workers, "--no-progress"]
    if teacher is not None:
        argv += ["--teacher", str(teacher)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    return tuple(argv)


def teacher_path(cfg: AblationConfig) -> Path:
    return cfg.teacher if cfg.teacher is not None else cfg.out / "teacher" / "teacher"


def plan(ablation: Ablation, cfg: AblationConfig) -> list[Step]:
    """The ordered steps (pure: writes nothing). Arms' recipes are resolved and validated here."""
    base = load_recipe(cfg.recipe)
    steps: list[Step] = []
    teacher_run = cfg.out / "teacher"
    if cfg.teacher is None:
        steps.append(Step("teacher", teacher_run, "teacher",
                          argv=_train_argv(cfg, "teacher", teacher_run, cfg.recipe, None, cfg.teacher_steps)))
    for arm in ablation.arms:
        recipe = arm_recipe(base, arm)
        if recipe.world != base.world:
            raise ValueError(f"arm {arm.name!r}: arms must not change the world (same data in every arm)")
        key = recipe_key(recipe, arm, cfg.max_steps)
        for seed in cfg.seeds:
            run = cfg.out / "runs" / key / f"seed{seed}"
            for stage in arm.stages:
                if stage in arm.skip:
                    steps.append(Step("skip", run, stage, arm.name, seed))
                else:
                    steps.append(Step("train", run, stage, arm.name, seed, _train_argv(
                        cfg, stage, run, run / "recipe.yaml", teacher_path(cfg), cfg.max_steps)))
            steps.append(Step("eval", run, arm.evaluated_stage, arm.name, seed))
    # The teacher's own score, the table's reference row: on its world, or (a given teacher) on the
    # first student run's world, which is the same recipe world.
    first_run = next(s.run_dir for s in steps if s.kind == "eval")
    world = teacher_run / "world" if cfg.teacher is None else first_run / "world"
    steps.append(Step("eval", teacher_run, "teacher", data_dir=world))
    return steps


def _prepare_run(step: Step, base: Recipe, ablation: Ablation, cfg: AblationConfig) -> None:
    """RUN/recipe.yaml (the arm's recipe with this seed) and RUN/world -> the teacher run's world."""
    run = step.run_dir
    run.mkdir(parents=True, exist_ok=True)
    arm = next(a for a in ablation.arms if a.name == step.arm)
    recipe = arm_recipe(base, arm)
    data = {**recipe_dict(recipe), "seed": step.seed}
    (run / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    world = cfg.out / "teacher" / "world"
    if not (run / "world").exists() and (world / "manifest.json").exists():
        (run / "world").symlink_to(world.resolve(), target_is_directory=True)


def _skip_stage(step: Step) -> None:
    """An identity stage: RUN/stages/<stage>/hf is the previous stage's checkpoint."""
    from student.eval.evaluate import stage_model_dir

    previous = {"sft": "dpt", "dft": "sft", "d2d": "init", "d2s": "d2d", "preference": "d2s"}[step.stage]
    src = stage_model_dir(step.run_dir, previous, "student")
    dst = step.run_dir / "stages" / step.stage
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / "hf").exists():
        (dst / "hf").symlink_to(src.resolve(), target_is_directory=True)
    (dst / "skipped.json").write_text(json.dumps({"stage": step.stage, "identity_of": previous}) + "\n")


def execute(ablation: Ablation, cfg: AblationConfig, echo=print) -> None:
    """Run the plan's steps that have no output yet; a failing training command stops the ablation."""
    from student.eval.decode import DecodeConfig
    from student.eval.evaluate import evaluate_stage

    base = load_recipe(cfg.recipe)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for step in plan(ablation, cfg):
        label = f"{step.kind:<7} {step.arm or 'teacher'} seed{step.seed} {step.stage} ({step.run_dir})"
        if step.done():
            echo(f"done    {label}")
            continue
        echo(f"run     {label}")
        if step.kind in ("train", "skip"):
            _prepare_run(step, base, ablation, cfg)
        if step.kind in ("teacher", "train"):
            subprocess.run(step.argv, check=True, env=env)
        elif step.kind == "skip":
            _skip_stage(step)
        else:
            evaluate_stage(step.run_dir, step.stage, "teacher" if step.arm == "" else "student",
                           model_path=teacher_path(cfg) if step.arm == "" else None,
                           data_dir=step.data_dir or step.run_dir / "world", limit=cfg.eval_limit,
                           decode=DecodeConfig(), progress=False)


def collect(ablation: Ablation, cfg: AblationConfig) -> tuple[list[dict], dict | None]:
    """(rows {"arm", "seed", "summary"} from the arms' evaluation files, the teacher's summary or None)."""
    rows, teacher = [], None
    for step in plan(ablation, cfg):
        if step.kind != "eval" or not step.done():
            continue
        result = json.loads((step.run_dir / "eval" / f"{step.stage}_{'teacher' if not step.arm else 'student'}.json").read_text())
        if step.arm:
            rows.append({"arm": step.arm, "seed": step.seed, "summary": result["summary"], "run_dir": str(step.run_dir)})
        else:
            teacher = result["summary"]
    return rows, teacher


def write_results(ablation: Ablation, cfg: AblationConfig, command: str) -> Path:
    """OUT/<ablation>.md and .json from the evaluation files that exist (real runs only)."""
    rows, teacher = collect(ablation, cfg)
    if not rows:
        raise FileNotFoundError(f"{cfg.out}: no evaluation results for {ablation.name} yet; run the ablation first")
    agg = aggregate(rows, ablation.metrics)
    verdicts = [verdict(agg, *c) for c in ablation.claims]
    arms = [a.name for a in ablation.arms]
    md = [f"### {ablation.paper}: {ablation.question}", "",
          f"Command: `{command}`", "",
          f"Seeds {list(cfg.seeds)}; {cfg.max_steps or 'recipe'} steps per student stage; percentages, mean ± "
          "sample std over seeds.", "",
          results_table(arms, ablation.metrics, agg, teacher), ""]
    for v in verdicts:
        if "difference" in v:
            md.append(f"- {v['claim']}: **{v['result']}** (difference {100 * v['difference']:+.1f} points"
                      + (f", 2 se = {200 * v['se']:.1f})" if v["se"] is not None else ")"))
        else:
            md.append(f"- {v['claim']}: **{v['result']}**")
    out = cfg.out / f"{ablation.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    (cfg.out / f"{ablation.name}.json").write_text(json.dumps(
        {"ablation": ablation.name, "paper": ablation.paper, "command": command, "seeds": list(cfg.seeds),
         "max_steps": cfg.max_steps, "rows": rows, "teacher": teacher, "aggregate": agg, "verdicts": verdicts,
         "lower_is_better": [m for m in ablation.metrics if m in LOWER_IS_BETTER]},
        indent=2, allow_nan=False) + "\n")
    return out


def shell_command(argv) -> str:
    return " ".join(shlex.quote(a) for a in argv)
