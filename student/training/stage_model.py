"""Where each stage starts from, and where it writes its result, in the run directory.

    teacher      RUN/stages/teacher/init (fresh teacher, vision tower
                 pretrained on per-cell labels: teacher_init), else fresh -> RUN/teacher/
    init, dpt    a fresh student + the teacher's vision tower          -> RUN/stages/<stage>/hf/
                 (or assemble_student(vision_tower, student_llm) when the recipe names real checkpoints)
    d2d          RUN/stages/init/hf                                    -> RUN/stages/d2d/hf/
    d2s          RUN/stages/d2d/hf, upcycled to MoE (student.model.upcycle)
    preference   RUN/stages/d2s/hf
    sft, dft     RUN/stages/dpt/hf, RUN/stages/sft/hf

Every rank builds the same model (seeded builds, or loads of the same checkpoint), so no weights
cross the network before DeepSpeed takes over.
"""
from __future__ import annotations

from pathlib import Path

from actors.recipe import Recipe

__all__ = ["PREVIOUS_STAGE", "stage_output_dir", "teacher_dir", "stage_start_model", "stage_tokenizer",
           "check_student_tokenizer"]

PREVIOUS_STAGE: dict[str, str | None] = {
    "teacher": None,
    "init": None,
    "d2d": "init",
    "d2s": "d2d",
    "preference": "d2s",
    "dpt": None,
    "sft": "dpt",
    "dft": "sft",
}


def teacher_dir(run_dir: Path, recipe: Recipe) -> Path:
    """The teacher as an HF checkpoint: the recipe's path when it names a directory, else RUN/teacher."""
    named = recipe.model.teacher
    if named and Path(named).is_dir():
        return Path(named)
    return Path(run_dir) / "teacher"


def stage_output_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "teacher" if stage == "teacher" else Path(run_dir) / "stages" / stage / "hf"


def _world_tokenizer(run_dir: Path):
    from actors.shapes.tokenizer import load_tokenizer

    path = Path(run_dir) / "world" / "tokenizer"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no shapes-world tokenizer in the run directory (was the world generated?)")
    return load_tokenizer(path)


def _need(path: Path, what: str) -> Path:
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: {what} not found (no config.json); run that stage first, or check --run-dir")
    return path


def stage_start_model(stage: str, run_dir: Path, recipe: Recipe):
    """(model, processor) the stage trains from, in fp32 on CPU; the caller moves and wraps it."""
    from transformers import AutoProcessor

    from student.model import (
        assemble_student,
        build_processor,
        build_student,
        build_teacher,
        copy_vision_tower,
        get_preset,
        load_model,
        upcycle,
    )

    run_dir = Path(run_dir)
    m = recipe.model
    preset = get_preset(m.preset)
    prev = PREVIOUS_STAGE[stage]
    if prev is not None:
        src = _need(stage_output_dir(run_dir, prev), f"the {prev!r} stage's checkpoint (input of {stage!r})")
        model = load_model(src)
        processor = AutoProcessor.from_pretrained(str(src), local_files_only=True)
        if stage == "d2s":
            model = upcycle(model, m.num_experts, m.top_k, layers=m.moe_layers, seed=recipe.seed)
        return model, processor
    if stage == "teacher":
        from student.training.teacher_init import teacher_init_dir

        init = teacher_init_dir(run_dir)
        if (init / "config.json").exists():  # the vision tower pretrained by the driver (embedded world)
            return load_model(init), AutoProcessor.from_pretrained(str(init), local_files_only=True)
        tok = _world_tokenizer(run_dir)
        processor = build_processor(tok, preset.vision.image_size, preset.vision.patch_size)
        return build_teacher(preset, tok, seed=recipe.seed), processor
    # init / dpt: a fresh student with the teacher's vision tower (LLaVA-MoD and LLaVA-KD keep it frozen)
    if m.student_llm:
        if not m.vision_tower:
            raise ValueError("model.vision_tower: required with model.student_llm (assemble_student)")
        return assemble_student(m.vision_tower, m.student_llm, seed=recipe.seed)
    tdir = _need(teacher_dir(run_dir, recipe), "the teacher checkpoint (run --stage teacher, or set model.teacher)")
    teacher = load_model(tdir)
    processor = AutoProcessor.from_pretrained(str(tdir), local_files_only=True)
    student = build_student(preset, processor.tokenizer, seed=recipe.seed)
    copy_vision_tower(teacher, student)
    return student, processor


def stage_tokenizer(stage: str, run_dir: Path, recipe: Recipe):
    """The tokenizer of the model `stage` starts from, without loading any weights."""
    from transformers import AutoTokenizer

    prev = PREVIOUS_STAGE[stage]
    if prev is not None:
        src = _need(stage_output_dir(run_dir, prev), f"the {prev!r} stage's checkpoint (input of {stage!r})")
    elif stage != "teacher" and recipe.model.student_llm:
        from student.model.loading import tokenizer_with_image_token

        return tokenizer_with_image_token(recipe.model.student_llm)  # as assemble_student builds it
    elif stage != "teacher":
        src = _need(teacher_dir(run_dir, recipe), "the teacher checkpoint (run --stage teacher, or set model.teacher)")
    else:
        return _world_tokenizer(run_dir)
    return AutoTokenizer.from_pretrained(str(src), local_files_only=True)


def check_student_tokenizer(stage: str, run_dir: Path, recipe: Recipe, teacher_tokenizer_hash: str) -> None:
    """Refuse, before any training step, a stage whose student tokenizes differently from the teacher
    that annotated its rows: KL / DPO over another tokenizer's ids is silently meaningless."""
    from teacher_service.identity import TokenizerHashMismatch, tokenizer_hash

    ours = tokenizer_hash(stage_tokenizer(stage, run_dir, recipe))
    if ours != teacher_tokenizer_hash:
        prev = PREVIOUS_STAGE[stage]
        where = stage_output_dir(run_dir, prev) if prev else "the stage's start model"
        raise TokenizerHashMismatch(f"stage {stage!r}: the student ({where}) uses tokenizer {ours}, but its rows were annotated "
                         f"by a teacher with tokenizer {teacher_tokenizer_hash}: distillation over different token ids "
                         f"is meaningless; use a student and teacher with the same tokenizer")
