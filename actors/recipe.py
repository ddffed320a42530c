"""Typed, strict loading of the declarative recipes in `datasets/*.yaml`.

A recipe says which sources feed which stage, with what weights, and the stage's optimiser and loss
settings. Unknown keys are errors (a typo must not silently fall back to a default), and every field
is a dataclass field, so a run can write its resolved recipe next to its checkpoints.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("teacher", "init", "d2d", "d2s", "preference", "dpt", "sft", "dft")
SOURCE_FORMATS = ("shapes", "llava_json", "preference")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    format: str  # one of SOURCE_FORMATS
    path: str  # may use ${VAR} (environment) or ${world} (the generated shapes world)
    split: str | None = None
    tasks: tuple[str, ...] = ()  # keep only these `task` values (empty: all)
    weight: float = 1.0
    image_root: str | None = None
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source {self.name!r}: format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class OptimSpec:
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6


@dataclass(frozen=True)
class LossSpec:
    ce: float = 0.0
    kd: float = 0.0
    kd_kind: str = "forward"  # forward | reverse | jsd
    kd_positions: str = "response"  # response | response+instruction
    temperature: float = 1.0
    res: float = 0.0  # LLaVA-KD MDist, response positions
    vis: float = 0.0  # LLaVA-KD MDist, visual positions
    rel: float = 0.0  # LLaVA-KD RDist
    ground: float = 0.0  # the embedded teacher's grounding loss (student.losses.grounding); shapes world only
    aux: float = 0.01  # MoE load balancing, applied only when the student is sparse
    dpo_beta: float = 0.1
    dpo_kind: str = "sigmoid"


@dataclass(frozen=True)
class StageSpec:
    sources: tuple[SourceSpec, ...]
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    # Copies of the mix in one pass over the data: each pass starts the data plane's actors afresh
    # (~12-18 s on 2 cores), so a small dataset seen many times is cheaper as one long pass.
    repeat: int = 1
    # Regroup every N micro-batches by row length (student.training.worker.length_buckets); 1: off.
    # Less padding, but batches of like length: on the shapes chats it cut the teacher's step by 16% and
    # its caption exact match by ~20 points (docs/training.md), so the shapes recipe leaves it off.
    length_window: int = 1

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {self.repeat}")
        if self.length_window < 1:
            raise ValueError(f"length_window must be >= 1, got {self.length_window}")


@dataclass(frozen=True)
class WorldSpec:
    """How to generate the shapes world when the recipe uses it."""

    size: int = 3000
    seed: int = 0
    image_size: int = 48
    patch_size: int = 8
    noisy_rate: float = 0.15
    chat_turns: int = 6  # turns per training chat (actors.shapes.tasks.chat_records)


@dataclass(frozen=True)
class ModelSpec:
    preset: str = "tiny"
    teacher: str | None = None  # a local HF path or a Serve app name; None: train one (`teacher` stage)
    student_llm: str | None = None  # local HF path of a small LLM (real-model runs)
    vision_tower: str | None = None
    num_experts: int = 4
    top_k: int = 2
    moe_layers: str = "every_other"  # every_other (layers 0, 2, 4, ...; the LLaVA-MoD code) | all

    def __post_init__(self) -> None:
        if self.moe_layers not in ("every_other", "all"):
            raise ValueError(f"model.moe_layers must be 'every_other' or 'all', got {self.moe_layers!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model: need 1 <= top_k <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    stages: dict[str, StageSpec]
    model: ModelSpec = field(default_factory=ModelSpec)
    world: WorldSpec | None = None

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"recipe {self.name!r}: unknown stage(s) {sorted(unknown)}; valid: {STAGES}")


def _build(cls, data, where: str):
    """Build dataclass `cls` from plain YAML data, refusing unknown keys and naming where they are."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a bad value names its place, like an unknown key
        raise ValueError(f"{where}: {e}") from e


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        inner = args[0]
        return tuple(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    return _build(Recipe, data, where)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}")
    return parse_recipe(yaml.safe_load(path.read_text()), where=str(path))


def recipe_dict(recipe: Recipe) -> dict:
    """Plain data (tuples as lists), for writing the resolved recipe next to a run's checkpoints."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(recipe))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_path(template: str, variables: dict[str, str] | None = None, where: str = "path") -> str:
    """Expand ${name} from `variables`, then from the environment; an unset name is a clear error."""
    variables = variables or {}

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in variables:
            return str(variables[name])
        if name in os.environ:
            return os.environ[name]
        raise ValueError(f"{where}: ${{{name}}} is not set; export {name}=... or edit the recipe")

    return _VAR.sub(sub, template)
