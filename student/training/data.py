"""A stage's training rows as a Ray Dataset: from the data plane, or from annotated Parquet.

Workers never call the teacher: rows arrive annotated (teacher columns of `actors.columns`). The data
plane (`actors`: sources -> preprocess -> teacher annotation, with the teacher-output cache) builds
them from the recipe's sources; `--data DIR` instead reads rows that were already annotated (a
pre-extraction pass, or a copy of the cache) as Parquet.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DataPlaneUnavailable", "annotated_parquet", "write_annotated_parquet", "stage_dataset"]


class DataPlaneUnavailable(RuntimeError):
    """The actors data plane (preprocess + annotate) is not installed in this version."""


def annotated_parquet(path: str | Path):
    """(Ray Dataset, rows) of annotated rows stored as Parquet under `path`."""
    import ray.data

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: {path} does not exist")
    ds = ray.data.read_parquet(str(path))
    return ds, ds.count()


def write_annotated_parquet(rows: list[dict], path: str | Path) -> Path:
    """Store annotated rows (dicts of `actors.columns`) as Parquet that `annotated_parquet` reads."""
    import ray.data

    ray.data.from_items(rows).write_parquet(str(path))
    return Path(path)


def teacher_app(teacher: str | None, run_dir: Path, recipe) -> str | None:
    """The Serve app that annotates: --teacher NAME as given; --teacher PATH (or, with no --teacher,
    the run's trained RUN/teacher) deployed as an app named after the run; None when there is neither."""
    teacher = teacher or recipe.model.teacher
    path = Path(teacher) if teacher else Path(run_dir) / "teacher"
    if teacher and not path.is_dir():
        return teacher  # an existing Serve app (the shared endpoint)
    if not (path / "config.json").exists():
        return None
    from ray import serve

    from teacher_service.app import ServiceConfig, deploy

    name = f"teacher-{Path(run_dir).resolve().name}"
    if name not in serve.status().applications:
        deploy(ServiceConfig(model=str(path.resolve()), name=name, env_vars={"OMP_NUM_THREADS": "1"}))
    return name


def stage_dataset(recipe, stage: str, run_dir: Path, *, teacher: str | None, teacher_cache: Path | None):
    """The stage's annotated rows from the data plane (actors.pipeline.StageData; unpacks as
    (dataset, planned rows) and carries the pass ledger the workers close after each pass)."""
    try:
        from actors.annotate import annotation_plan
        from actors.pipeline import stage_dataset as data_plane_stage_dataset
    except ImportError as e:
        raise DataPlaneUnavailable(
            f"stage {stage!r}: the data plane (actors.pipeline) is not available in this version ({e}); "
            f"pass --data DIR with already-annotated rows (actors.columns) as Parquet"
        ) from None
    needs_teacher = annotation_plan(stage, recipe.stages[stage].loss) is not None
    app = teacher_app(teacher, run_dir, recipe) if needs_teacher else None
    if needs_teacher and app is None:
        raise ValueError(f"stage {stage!r} needs a teacher: pass --teacher NAME|PATH, set model.teacher in the "
                         f"recipe, or train one first (--stage teacher writes RUN/teacher)")
    return data_plane_stage_dataset(recipe, stage, run_dir, teacher=app, teacher_cache=teacher_cache)
