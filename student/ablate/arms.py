"""The papers' ablations in miniature: each arm is a stage list plus overrides of the shapes recipe.

Every arm of an ablation trains the same stages on the same world for the same number of steps per
stage (`--max-steps`); only what the paper varies differs. Overrides are deep-merged into the
recipe's plain data and re-parsed by actors.recipe, so a typo in an arm fails like a typo in a YAML.

Stages listed in `skip` are identity stages: their output is their predecessor's checkpoint (LLaVA-KD's
"PT+DFT" has no SFT between DPT and DFT, and the trainer starts DFT from RUN/stages/sft/hf).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.recipe import Recipe, parse_recipe, recipe_dict

__all__ = ["Arm", "Ablation", "ABLATIONS", "arm_recipe", "deep_merge", "get_ablation"]


@dataclass(frozen=True)
class Arm:
    name: str
    stages: tuple[str, ...]  # trained in order, after the shared teacher
    overrides: dict = field(default_factory=dict, hash=False)
    skip: tuple[str, ...] = ()  # identity stages (their output = the previous stage's checkpoint)

    @property
    def evaluated_stage(self) -> str:
        """The last trained stage: its checkpoint is the arm's result."""
        return [s for s in self.stages if s not in self.skip][-1]


@dataclass(frozen=True)
class Ablation:
    name: str
    paper: str
    question: str
    arms: tuple[Arm, ...]
    metrics: tuple[str, ...]  # student.eval summary keys the table shows
    # (better arm, worse arm, metric, lower_is_better): the paper's claim, checked by aggregate.verdict
    claims: tuple[tuple[str, str, str, bool], ...] = ()


MIMIC = ("init", "d2d", "d2s")
PT = {"ce": 1.0, "res": 0.0, "vis": 0.0, "rel": 0.0}  # LLaVA-KD's plain pre-training: captions, CE only
STEP_MATCHED = "DPT+SFT, SFT 2x"  # LLaVA-KD Table 2's control: as many steps as DPT+SFT+DFT
COMPREHENSION = ("vqa_accuracy", "vqa_colour", "vqa_shape", "vqa_count", "vqa_position", "vqa_size",
                 "pope_f1", "caption_exact_match")
HALLUCINATION = ("hallucination_resp", "hallucination_ment", "pope_f1", "pope_f1_adversarial", "object_recall",
                 "vqa_accuracy")

ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation(
        name="mod-preference", paper="LLaVA-MoD Table 5",
        question="Does preference distillation (DPO, teacher as reference) after mimic distillation reduce hallucination?",
        arms=(Arm("mimic", MIMIC), Arm("mimic+preference", MIMIC + ("preference",))),
        metrics=HALLUCINATION,
        claims=(("mimic+preference", "mimic", "hallucination_resp", True),
                ("mimic+preference", "mimic", "hallucination_ment", True)),
    ),
    Ablation(
        name="mod-kd-vs-sft", paper="LLaVA-MoD Table 6",
        question="Does distillation train an E4T2 student better than supervised fine-tuning on the same data?",
        # The trainer's d2d objective is KL only (no CE term), so neither arm runs d2d: the E4T2 student
        # is trained in d2s from the init checkpoint, by CE alone (SFT) or by CE + KL (KD).
        arms=(Arm("SFT", MIMIC, {"model": {"num_experts": 4, "top_k": 2},
                                 "stages": {"d2s": {"loss": {"kd": 0.0, "ce": 1.0}}}}, skip=("d2d",)),
              Arm("KD", MIMIC, {"model": {"num_experts": 4, "top_k": 2},
                                "stages": {"d2s": {"loss": {"kd": 1.0, "ce": 1.0}}}}, skip=("d2d",))),
        metrics=COMPREHENSION,
        claims=(("KD", "SFT", "vqa_accuracy", False),),
    ),
    Ablation(
        name="mod-distill-tokens", paper="LLaVA-MoD Table 7",
        question="Is distilling the response alone better than distilling response and instruction?",
        arms=(Arm("response+instruction", MIMIC, {"stages": {
                  "d2d": {"loss": {"kd_positions": "response+instruction"}},
                  "d2s": {"loss": {"kd_positions": "response+instruction"}}}}),
              Arm("response", MIMIC, {"stages": {
                  "d2d": {"loss": {"kd_positions": "response"}}, "d2s": {"loss": {"kd_positions": "response"}}}})),
        metrics=COMPREHENSION,
        claims=(("response", "response+instruction", "vqa_accuracy", False),),
    ),
    Ablation(
        name="mod-dense-vs-sparse", paper="LLaVA-MoD Table 8",
        question="Does a sparse E4T1 student distil better than a dense one with the same active parameters?",
        # Dense = one expert, top-1: the upcycled FFN is the dense FFN (softmax over one logit is 1),
        # so both arms go through the same d2s code path with equal active parameters.
        arms=(Arm("dense", MIMIC, {"model": {"num_experts": 1, "top_k": 1}}),
              Arm("sparse E4T1", MIMIC, {"model": {"num_experts": 4, "top_k": 1}})),
        metrics=COMPREHENSION,
        claims=(("sparse E4T1", "dense", "vqa_accuracy", False),),
    ),
    Ablation(
        name="kd-stages", paper="LLaVA-KD Table 2",
        question="Which training scheme is best: PT+SFT, PT+DFT, DPT+SFT, DPT+DFT or DPT+SFT+DFT?",
        arms=(Arm("PT+SFT", ("dpt", "sft"), {"stages": {"dpt": {"loss": PT}}}),
              Arm("PT+DFT", ("dpt", "sft", "dft"), {"stages": {"dpt": {"loss": PT}}}, skip=("sft",)),
              Arm("DPT+SFT", ("dpt", "sft")),
              Arm("DPT+DFT", ("dpt", "sft", "dft"), skip=("sft",)),
              Arm("DPT+SFT+DFT", ("dpt", "sft", "dft")),
              # The three-stage scheme trains one stage more than the others; this control gives the
              # extra steps to SFT instead (recipe steps: dpt 40 + sft 120 = dpt 40 + sft 60 + dft 60).
              Arm(STEP_MATCHED, ("dpt", "sft"), {"stages": {"sft": {"max_steps": 120}}})),
        metrics=COMPREHENSION,
        claims=(("DPT+SFT+DFT", "PT+SFT", "vqa_accuracy", False), ("DPT+SFT+DFT", STEP_MATCHED, "vqa_accuracy", False),
                ("DPT+SFT", "PT+SFT", "vqa_accuracy", False), ("PT+DFT", "PT+SFT", "vqa_accuracy", False)),
    ),
)}


def get_ablation(name: str) -> Ablation:
    try:
        return ABLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown ablation {name!r}; known: {sorted(ABLATIONS)}") from None


def deep_merge(base: dict, overrides: dict, where: str = "overrides") -> dict:
    """A copy of `base` with `overrides` merged in; a key absent from `base` is an error naming it."""
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"{where}.{key}: not in the recipe (keys: {sorted(base)})")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = deep_merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def arm_recipe(base: Recipe, arm: Arm) -> Recipe:
    """The base recipe with the arm's overrides, validated by actors.recipe; every arm stage must exist."""
    data = recipe_dict(base)
    # Loss and optimiser fields are all declared, so make them mergeable even when the YAML left them out.
    recipe = parse_recipe(deep_merge(data, arm.overrides, where=f"arm {arm.name!r}"), where=f"arm {arm.name!r}")
    missing = [s for s in arm.stages if s not in recipe.stages]
    if missing:
        raise ValueError(f"arm {arm.name!r}: recipe {base.name!r} has no stage(s) {missing}")
    return recipe
