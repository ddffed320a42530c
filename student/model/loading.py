"""Load real models from local Hugging Face directories (never the Hub: `local_files_only=True`).

- `load_model` / `load_teacher`: any `AutoModelForImageTextToText` checkpoint (ours after `export`,
  or e.g. a LLaVA/Qwen-VL teacher), MoE experts on `grouped_mm` (the reload default is not written
  in config.json, so we set it rather than trust it).
- `assemble_student`: LLaVA-MoD's student recipe, a pretrained vision tower + a small pretrained LLM +
  a fresh 2-layer MLP projector, as a stock Llava model with its processor.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from student.model.builder import seeded
from student.model.upcycle import is_moe

__all__ = ["load_model", "load_teacher", "assemble_student", "ensure_grouped_mm", "tokenizer_with_image_token"]

IMAGE_TOKEN = "<image>"


def ensure_grouped_mm(model) -> None:
    """MoE experts via grouped_mm (the batched_mm alternative gathers weights per token: slow, GBs of RAM)."""
    if is_moe(model):
        key = "text_config" if hasattr(model.config, "text_config") else ""
        model.set_experts_implementation({key: "grouped_mm"} if key else "grouped_mm")


def load_model(path: str | Path, *, dtype: torch.dtype | str = torch.float32, device_map=None):
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=dtype, device_map=device_map, local_files_only=True
    )
    ensure_grouped_mm(model)
    return model


def load_teacher(path: str | Path, *, dtype: torch.dtype | str = torch.float32, device_map=None):
    """(model in eval mode, processor) for a frozen teacher."""
    model = load_model(path, dtype=dtype, device_map=device_map).eval()
    model.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(str(path), local_files_only=True)


def _vision_tower(path: str | Path, dtype):
    """A vision tower from a vision-only checkpoint (CLIPVisionModel, SiglipVisionModel) or a full CLIP/SigLIP one."""
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vcfg = getattr(cfg, "vision_config", None) or cfg
    full = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tower = getattr(full, "vision_model", full) if vcfg is not cfg else full
    return vcfg, tower


def tokenizer_with_image_token(path: str | Path):
    """The LLM's tokenizer with a named `image_token` (added as '<image>' when absent), persisted on save."""
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if getattr(tok, "image_token", None) is None:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, model_specific_special_tokens={"image_token": IMAGE_TOKEN}
        )
        if IMAGE_TOKEN not in tok.get_vocab():
            tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tok


def assemble_student(
    vision_path: str | Path,
    llm_path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    vision_feature_layer: int = -2,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Vision tower + small LLM + fresh projector, as a Llava model and processor.

    vision_feature_layer defaults to -2 as in LLaVA: the last layer of a contrastively trained tower is
    specialised to the contrastive head. A tokenizer without an image token gets '<image>' added; the
    embeddings grow only if the tokenizer then outgrows them (Qwen's padded vocab usually has room).
    """
    tokenizer = tokenizer_with_image_token(tokenizer_path or llm_path)
    image_token, image_token_id = tokenizer.image_token, tokenizer.image_token_id

    vcfg, tower = _vision_tower(vision_path, dtype)
    llm = AutoModelForCausalLM.from_pretrained(str(llm_path), dtype=dtype, local_files_only=True)
    if len(tokenizer) > llm.config.vocab_size:
        llm.resize_token_embeddings(len(tokenizer))

    siglip = vcfg.model_type.startswith("siglip")
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=llm.config,
        image_token_index=image_token_id,
        image_seq_length=patches,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full" if siglip else "default",  # SigLIP has no CLS token
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
    )
    with seeded(seed):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.tie_weights()

    try:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(str(vision_path), local_files_only=True)
    except (OSError, ValueError):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": vcfg.image_size}, crop_size={"height": vcfg.image_size, "width": vcfg.image_size}
        )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=0 if siglip else 1,
        image_token=image_token,
        chat_template=getattr(tokenizer, "chat_template", None),
    )
    return model, processor
