"""Typed model presets: one vision tower shared by a bigger teacher LLM and a smaller student LLM.

Sizes are chosen for the shapes world (48x48 images, 8 px patches -> 36 image tokens) on CPU:
- the teacher must learn question-conditioned binding ("what colour is the circle?") within the demo's
  budget on 2 cores. Measured (docs/training.md): an H128 x 2 LM trained 600 steps on the world's
  chats over the frozen pretrained tower (a 4.3 min stage: VQA 80%, POPE 92-97%) beats the H256 x 4
  one that got 100 steps in a 3.2 min stage (VQA 39%, POPE 52%), hence H128 wide for `tiny`; a third
  layer at the same wall time (600 steps of 3 layers vs 800 of 2, 2026-12-07) lifted "where is X?"
  from 82% to 87-90% and caption exact match from 74% to 80-82%, hence H128 x 3;
- the student must be genuinely smaller (a fifth of the teacher's LM parameters in `tiny`) so
  distillation has something to transfer;
- every head_dim is >= 32 because vLLM's CPU attention kernels refuse smaller heads, and we want the
  very same checkpoints to serve there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["VisionSpec", "LLMSpec", "ModelPreset", "PRESETS", "get_preset", "MIN_HEAD_DIM"]

MIN_HEAD_DIM = 32
Family = Literal["qwen3", "qwen2"]


@dataclass(frozen=True)
class VisionSpec:
    """A CLIP-style ViT. The CLS token is dropped (strategy "default"), so image tokens = num_patches."""

    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.hidden_size % self.num_heads or self.head_dim < MIN_HEAD_DIM:
            raise ValueError(
                f"vision: hidden_size {self.hidden_size} / num_heads {self.num_heads} must be an integer "
                f">= {MIN_HEAD_DIM} (vLLM CPU attention)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LLMSpec:
    """A Qwen3 (default) or Qwen2 decoder. head_dim is explicit, as in Qwen3 configs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 32
    family: Family = "qwen3"
    max_position_embeddings: int = 1024
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = False  # untied: the tiny vocab makes tying save little, and untied is simplest to serve

    def __post_init__(self) -> None:
        if self.family not in ("qwen3", "qwen2"):
            raise ValueError(f"family must be 'qwen3' or 'qwen2', got {self.family!r}")
        if self.head_dim < MIN_HEAD_DIM:
            raise ValueError(f"head_dim must be >= {MIN_HEAD_DIM} (vLLM CPU attention), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.family == "qwen2" and self.num_heads * self.head_dim != self.hidden_size:
            # Qwen2's projections are sized hidden_size -> heads * head_dim; keep them square so weights port to vLLM.
            raise ValueError("qwen2: num_heads * head_dim must equal hidden_size")


@dataclass(frozen=True)
class ModelPreset:
    name: str
    vision: VisionSpec
    teacher: LLMSpec
    student: LLMSpec
    notes: str = field(default="", compare=False)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        vision=VisionSpec(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
        teacher=LLMSpec(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=4, intermediate_size=384),
        student=LLMSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=192),
        notes="CPU default: trains end to end in minutes on 2 cores.",
    ),
    "small": ModelPreset(
        name="small",
        vision=VisionSpec(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=1024),
        teacher=LLMSpec(
            hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536, head_dim=64
        ),
        student=LLMSpec(
            hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768, head_dim=64
        ),
        notes="One GPU, or a patient CPU.",
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
