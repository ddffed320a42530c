"""The student/teacher models: stock Hugging Face Llava classes with Qwen3/Qwen2 (or their MoE) LLMs.

presets        typed presets `tiny` and `small` (teacher + student LLM, shared vision tower)
builder        build Llava models and the LlavaProcessor from presets
loading        load real local HF checkpoints; assemble a student from tower + LLM + fresh projector
upcycle        dense -> MoE sparse upcycling (exact at init)
router_stats   router logits via hooks -> per-layer load, entropy, aux and z losses
trainable      per-stage trainable parameters
tokenizer_compat  teacher/student tokenizer check, padded-vocab logit masking
export         HF checkpoint export and total/active parameter report
"""
from student.model.builder import (
    build_llava,
    build_processor,
    build_student,
    build_teacher,
    copy_vision_tower,
    llava_config,
    padded_vocab_size,
    text_config,
    vision_config,
)
from student.model.export import export, parameter_report
from student.model.loading import assemble_student, ensure_grouped_mm, load_model, load_teacher
from student.model.presets import PRESETS, LLMSpec, ModelPreset, VisionSpec, get_preset
from student.model.router_stats import LayerRouterStats, RouterRecorder, RouterStats, find_routers
from student.model.tokenizer_compat import (
    Mismatch,
    TokenizerMismatchError,
    check_tokenizers,
    find_mismatches,
    mask_padded_logits,
    vocab_mask,
)
from student.model.trainable import STAGES, apply_trainable, param_group, trainable_parameter_names
from student.model.upcycle import is_moe, moe_layer_indices, moe_text_config, upcycle

__all__ = [
    "PRESETS",
    "STAGES",
    "LLMSpec",
    "LayerRouterStats",
    "Mismatch",
    "ModelPreset",
    "RouterRecorder",
    "RouterStats",
    "TokenizerMismatchError",
    "VisionSpec",
    "apply_trainable",
    "assemble_student",
    "build_llava",
    "build_processor",
    "build_student",
    "build_teacher",
    "check_tokenizers",
    "copy_vision_tower",
    "ensure_grouped_mm",
    "export",
    "find_mismatches",
    "find_routers",
    "get_preset",
    "is_moe",
    "llava_config",
    "load_model",
    "load_teacher",
    "mask_padded_logits",
    "moe_layer_indices",
    "moe_text_config",
    "padded_vocab_size",
    "param_group",
    "parameter_report",
    "text_config",
    "trainable_parameter_names",
    "upcycle",
    "vision_config",
    "vocab_mask",
]
