"""Per-stage objectives: which loss terms a stage adds up, and with what weights.

    teacher            : ce * ce + ground * ground              (ground: the shapes world's grounding loss)
    init, sft          : ce                                     (next-token CE)
    d2d                : kd * kl                                (LLaVA-MoD Eq. 6)
    d2s                : ce * ce + kd * kl                      (LLaVA-MoD Eq. 7)
    preference         : dpo * dpo                              (LLaVA-MoD Eq. 8)
    dpt                : ce * ce + res * L_res + vis * L_vis + rel * L_rel   (LLaVA-KD Eq. 6, CE = L_PT)
    dft                : ce * ce + res * L_res + vis * L_vis + rel * L_rel   (LLaVA-KD Eq. 7)
    + aux * aux        for a sparse (MoE) student, in any stage

Terms are the already-reduced scalar losses (e.g. "kl" and "res" both come from kd_loss, at the
response positions; "vis" at the visual positions; "rel" from rdist_loss). A missing or unexpected
term is an error: a term computed but silently dropped (or a forgotten aux loss) is a quiet bug.
A term weighted 0 is switched off (an ablation arm: d2s without KL, LLaVA-KD's plain PT): the stage
neither needs nor takes it, so nothing annotates, computes or logs it (`active_terms`).
The field names match `actors.recipe.LossSpec`, so a recipe's loss block maps onto LossWeights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from torch import Tensor

__all__ = ["STAGE_TERMS", "LossWeights", "active_terms", "stage_loss"]

# stage -> (term name, weight field) pairs
STAGE_TERMS: dict[str, tuple[tuple[str, str], ...]] = {
    "teacher": (("ce", "ce"), ("ground", "ground")),
    "init": (("ce", "ce"),),
    "sft": (("ce", "ce"),),
    "d2d": (("kl", "kd"),),
    "d2s": (("ce", "ce"), ("kl", "kd")),
    "preference": (("dpo", "dpo"),),
    "dpt": (("ce", "ce"), ("res", "res"), ("vis", "vis"), ("rel", "rel")),
    "dft": (("ce", "ce"), ("res", "res"), ("vis", "vis"), ("rel", "rel")),
}


@dataclass(frozen=True)
class LossWeights:
    """Defaults from the papers: LLaVA-KD alpha = beta = 1, gamma = 0.5 (both DPT and DFT);
    LLaVA-MoD KL and CE unweighted, MoE aux 0.01. A stage's recipe overrides them."""

    ce: float = 1.0
    kd: float = 1.0
    dpo: float = 1.0
    res: float = 1.0  # alpha / alpha'
    vis: float = 1.0  # beta / beta'
    rel: float = 0.5  # gamma / gamma'
    aux: float = 0.01
    ground: float = 0.0  # not in the papers: the embedded teacher's grounding loss, off unless a recipe sets it

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"LossWeights.{name}: must be a number >= 0, got {value!r}")


def active_terms(stage: str, weights: LossWeights = LossWeights()) -> tuple[str, ...]:
    """The terms of `stage` that `weights` does not switch off (weight 0), in STAGE_TERMS order."""
    if stage not in STAGE_TERMS:
        raise ValueError(f"stage: unknown {stage!r}; valid stages: {', '.join(STAGE_TERMS)}")
    active = tuple(t for t, f in STAGE_TERMS[stage] if getattr(weights, f) != 0)
    if not active:
        raise ValueError(f"weights: every term of stage {stage!r} is weighted 0; nothing to train")
    return active


def stage_loss(
    stage: str,
    terms: Mapping[str, Tensor],
    weights: LossWeights = LossWeights(),
    sparse: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, logged) for one stage. logged holds each raw term and "total", detached."""
    active = active_terms(stage, weights)
    used = [(t, f) for t, f in STAGE_TERMS[stage] if t in active]
    used += [("aux", "aux")] if sparse else []
    names = {t for t, _ in used}
    missing = sorted(names - set(terms))
    if missing:
        raise ValueError(f"terms: stage {stage!r} (sparse={sparse}) needs {sorted(names)}, missing {missing}")
    extra = sorted(set(terms) - names)
    if extra:
        raise ValueError(f"terms: stage {stage!r} (sparse={sparse}) does not use {extra}; it takes exactly {sorted(names)}")
    total = None
    for term, field in used:
        value = terms[term]
        if value.dim() != 0:
            raise ValueError(f"terms[{term!r}]: expected a scalar loss, got shape {tuple(value.shape)}")
        part = getattr(weights, field) * value
        total = part if total is None else total + part
    logged = {t: terms[t].detach() for t, _ in used}
    logged["total"] = total.detach()
    return total, logged
