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


def stage_dataset(recipe, stage: str, run_dir: Path, *, teacher: str | None, teacher_cache: Path | None):
    """(Ray Dataset, rows per epoch) of the stage's annotated rows, built by the data plane."""
    try:
        from actors import annotate, preprocess  # noqa: F401  (the data plane, issue 6)
    except ImportError as e:
        raise DataPlaneUnavailable(
            f"stage {stage!r}: the data plane (actors.preprocess / actors.annotate) is not available in this "
            f"version ({e}); pass --data DIR with already-annotated rows (actors.columns) as Parquet"
        ) from None
    raise DataPlaneUnavailable(f"stage {stage!r}: data-plane integration pending")  # pragma: no cover
