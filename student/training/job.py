"""What one stage's training job needs, as one picklable dataclass the driver hands every worker."""
from __future__ import annotations

import math
from dataclasses import dataclass

from actors.recipe import Recipe, StageSpec

__all__ = ["StageJob", "total_steps"]


@dataclass(frozen=True)
class StageJob:
    stage: str
    run_dir: str  # absolute; must be storage every worker sees (like Ray Train's storage_path)
    recipe: Recipe
    rows: int  # samples per epoch (before the data plane's rejects)
    zero_stage: int = 2
    max_steps: int | None = None
    checkpoint_every: int = 50
    use_gpu: bool = False
    progress: bool = True
    shuffle_buffer: int = 256  # rows; local shuffle in each worker, seeded per epoch

    @property
    def spec(self) -> StageSpec:
        return self.recipe.stages[self.stage]

    @property
    def seed(self) -> int:
        return self.recipe.seed


def total_steps(spec: StageSpec, rows: int, global_batch: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a stage: --max-steps (more epochs if needed), else epochs * rows / batch capped
    by the recipe's max_steps."""
    if max_steps is not None:
        return max_steps
    per_epoch = max(1, rows // max(1, global_batch))
    steps = max(1, math.ceil(spec.epochs * per_epoch))
    return min(steps, spec.max_steps) if spec.max_steps is not None else steps
