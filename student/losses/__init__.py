"""Distillation losses for mod-distill: pure functions of tensors (see docs/losses.md)."""
from .chunked import IGNORE_INDEX, ce_loss, chunked_loss, chunked_row_values
from .dpo import DPO_KINDS, dpo_loss, sequence_logps
from .grounding import grounding_loss
from .kd import KD_KINDS, FullTeacher, Teacher, TopKTeacher, divergence, kd_loss
from .moe_aux import expert_load, load_balancing_loss, router_z_loss
from .objectives import STAGE_TERMS, LossWeights, active_terms, stage_loss
from .positions import MASK_KINDS, select_mask, shift_labels
from .rdist import rdist_loss, relation_matrix

__all__ = [
    "IGNORE_INDEX",
    "ce_loss",
    "chunked_loss",
    "chunked_row_values",
    "DPO_KINDS",
    "dpo_loss",
    "sequence_logps",
    "grounding_loss",
    "KD_KINDS",
    "FullTeacher",
    "TopKTeacher",
    "Teacher",
    "divergence",
    "kd_loss",
    "expert_load",
    "load_balancing_loss",
    "router_z_loss",
    "STAGE_TERMS",
    "active_terms",
    "LossWeights",
    "stage_loss",
    "MASK_KINDS",
    "select_mask",
    "shift_labels",
    "rdist_loss",
    "relation_matrix",
]
