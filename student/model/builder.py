"""Build Llava models (CLIP-style ViT + 2-layer MLP projector + Qwen LLM) and their processor from presets.

Every model is a stock `LlavaForConditionalGeneration`, so `AutoModelForImageTextToText.from_pretrained`
reloads it and vLLM serves it; nothing here subclasses a Hugging Face module.

Vocabulary: by default the embedding has exactly `len(tokenizer)` rows. Padding it to a multiple of 64
(`vocab_multiple=64`) is supported for parity with real Qwen checkpoints (151936 rows for a 151665-token
tokenizer), but a padded row is a token the model can emit and no tokenizer can decode; a stock HF
model cannot mask it internally, so every consumer would have to call `mask_padded_logits`. The
shapes-world models are tiny and CPU-bound, where padding buys no speed, so we do not pad them.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from student.model.presets import LLMSpec, ModelPreset, VisionSpec

__all__ = [
    "vision_config",
    "text_config",
    "llava_config",
    "build_llava",
    "build_teacher",
    "build_student",
    "build_processor",
    "copy_vision_tower",
    "padded_vocab_size",
    "seeded",
]


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 1) -> int:
    if multiple < 1:
        raise ValueError(f"vocab multiple must be >= 1, got {multiple}")
    return -(-tokenizer_vocab // multiple) * multiple


def vision_config(spec: VisionSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        projection_dim=spec.hidden_size,  # unused by the tower; kept small so the config reads sensibly
    )


def text_config(spec: LLMSpec, tokenizer, vocab_multiple: int = 1) -> PretrainedConfig:
    common = dict(
        vocab_size=padded_vocab_size(len(tokenizer), vocab_multiple),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen3Config(**common) if spec.family == "qwen3" else Qwen2Config(**common)


def _image_token_id(tokenizer) -> int:
    tid = getattr(tokenizer, "image_token_id", None)
    if tid is None:
        raise ValueError("the tokenizer has no image token (expected `tokenizer.image_token_id`, e.g. for '<image>')")
    return int(tid)


def llava_config(vision: VisionSpec, llm: LLMSpec, tokenizer, vocab_multiple: int = 1) -> LlavaConfig:
    return LlavaConfig(
        vision_config=vision_config(vision),
        text_config=text_config(llm, tokenizer, vocab_multiple),
        image_token_index=_image_token_id(tokenizer),
        image_seq_length=vision.num_patches,
        # Our towers are trained from scratch through their last layer (there is no contrastive
        # pretraining whose last layer would be too task-specific), so use it, not the usual -2.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLS: 36 features for 36 image tokens
        projector_hidden_act="gelu",
        tie_word_embeddings=llm.tie_word_embeddings,
    )


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed weight init without disturbing the caller's global RNG stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_llava(
    vision: VisionSpec,
    llm: LLMSpec,
    tokenizer,
    *,
    vocab_multiple: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> LlavaForConditionalGeneration:
    cfg = llava_config(vision, llm, tokenizer, vocab_multiple)
    with seeded(seed):
        model = LlavaForConditionalGeneration(cfg)
    return model.to(dtype)


def build_teacher(preset: ModelPreset, tokenizer, **kw) -> LlavaForConditionalGeneration:
    return build_llava(preset.vision, preset.teacher, tokenizer, **kw)


def build_student(preset: ModelPreset, tokenizer, **kw) -> LlavaForConditionalGeneration:
    return build_llava(preset.vision, preset.student, tokenizer, **kw)


def build_processor(
    tokenizer,
    image_size: int = 48,
    patch_size: int = 8,
    *,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> LlavaProcessor:
    """LlavaProcessor whose one `<image>` expands to (image_size / patch_size)^2 image tokens.

    Uses the PIL CLIP image processor directly: no torchvision needed, and no fast/slow warning.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kw = {}
    if image_mean is not None:
        kw["image_mean"] = list(image_mean)
    if image_std is not None:
        kw["image_std"] = list(image_std)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **kw
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by the "default" strategy
        chat_template=getattr(tokenizer, "chat_template", None),
    )


@torch.no_grad()
def copy_vision_tower(src: LlavaForConditionalGeneration, dst: LlavaForConditionalGeneration) -> None:
    """Give the student the teacher's (pretrained) vision tower: LLaVA-MoD keeps the encoder unchanged.

    Strict loading makes differing tower shapes an error rather than a partial copy.
    """
    dst.model.vision_tower.load_state_dict(src.model.vision_tower.state_dict())
