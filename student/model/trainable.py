"""Which parameters each stage trains: one pure function over parameter names.

    stage                      trains
    init, dpt                  projector                                  (align image tokens to the LLM)
    d2d, sft, dft              projector + LLM                            (vision tower frozen)
    teacher                    projector + LLM                            (its tower is pretrained first, then frozen)
    d2s, preference            projector + every `mlp.*` of the LLM       (LLaVA-MoD 3.2: theta = {omega, phi_e})

`mlp.*` in d2s/preference means: the experts and routers of each MoE layer, plus, for Qwen2-MoE, the
shared expert and its sigmoid gate (they are part of the sparse block and start at zero output, so
freezing them would leave them dead). On layers left dense by every-other-layer upcycling, the dense
FFN also trains: it is that layer's only "expert", this is what LLaVA-MoD's code does (it trains
`mlp.*`), and freezing it would halve the FFN capacity the stage can adapt. Attention, norms,
embeddings and lm_head stay frozen. On a dense model (the Table 8 dense ablation) the same rule selects
projector + FFNs, so dense and sparse runs train the same kind of parameters.

Vision towers are never trained by a stage. The shapes world has no pretrained ViT, so its driver
pretrains the teacher's tower on per-cell labels before the `teacher` stage (student.vision_pretrain),
which then keeps it frozen like LLaVA's CLIP: training it with the LLM from the chats' CE undid the
pretraining (measured: POPE 98% -> 56%, colour 95% -> 75% at 600 steps, docs/training.md).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from actors.recipe import STAGES

__all__ = ["STAGES", "STAGE_GROUPS", "param_group", "trainable_parameter_names", "apply_trainable"]

# Parameter groups, by name. Checked in this order; every parameter must fall in exactly one.
_GROUPS: tuple[tuple[str, re.Pattern], ...] = (
    ("vision", re.compile(r"(^|\.)vision_tower\.")),
    ("projector", re.compile(r"(^|\.)multi_modal_projector\.")),
    ("ffn", re.compile(r"(^|\.)language_model\.(.+\.)?layers\.\d+\.mlp\.")),
    ("llm", re.compile(r"(^|\.)(language_model|lm_head)\.")),
)

STAGE_GROUPS: dict[str, frozenset[str]] = {
    "teacher": frozenset({"projector", "llm", "ffn"}),
    "init": frozenset({"projector"}),
    "dpt": frozenset({"projector"}),
    "d2d": frozenset({"projector", "llm", "ffn"}),
    "sft": frozenset({"projector", "llm", "ffn"}),
    "dft": frozenset({"projector", "llm", "ffn"}),
    "d2s": frozenset({"projector", "ffn"}),
    "preference": frozenset({"projector", "ffn"}),
}
assert set(STAGE_GROUPS) == set(STAGES), "trainable.STAGE_GROUPS is out of step with actors.recipe.STAGES"


def param_group(name: str) -> str:
    """'vision' | 'projector' | 'ffn' | 'llm' for a Llava parameter name; ValueError for anything else."""
    for group, pattern in _GROUPS:
        if pattern.search(name):
            return group
    raise ValueError(f"parameter {name!r} is not part of a known Llava layout (vision_tower / projector / LLM)")


def trainable_parameter_names(model: nn.Module | Iterable[str], stage: str) -> set[str]:
    """Names of the parameters `stage` trains. Accepts a model or its parameter names; touches nothing."""
    if stage not in STAGE_GROUPS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    names = [n for n, _ in model.named_parameters()] if isinstance(model, nn.Module) else list(model)
    groups = STAGE_GROUPS[stage]
    return {n for n in names if param_group(n) in groups}


def apply_trainable(model: nn.Module, stage: str) -> set[str]:
    """Set requires_grad for `stage` (everything else frozen); returns the trainable names."""
    selected = trainable_parameter_names(model, stage)
    for name, p in model.named_parameters():
        p.requires_grad_(name in selected)
    return selected
