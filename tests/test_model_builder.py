"""Presets and the Llava builder: shapes, config wiring, processor expansion, determinism."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

from actors.shapes.world import WorldConfig
from student.model import (
    PRESETS,
    LLMSpec,
    VisionSpec,
    build_llava,
    build_student,
    build_teacher,
    copy_vision_tower,
    get_preset,
    llava_config,
    parameter_report,
)
from model_inputs import image_text_batch


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_the_world_and_keep_heads_vllm_sized(name):
    p = get_preset(name)
    world = WorldConfig()
    assert (p.vision.image_size, p.vision.patch_size, p.vision.num_patches) == (world.image_size, world.patch_size, 36)
    assert min(p.vision.head_dim, p.teacher.head_dim, p.student.head_dim) >= 32
    t, s = p.teacher, p.student
    assert t.hidden_size > s.hidden_size and t.num_layers >= s.num_layers and t.intermediate_size > s.intermediate_size


def test_teacher_language_model_is_clearly_bigger(shapes_tokenizer):
    p = get_preset("tiny")
    t = parameter_report(build_teacher(p, shapes_tokenizer))
    s = parameter_report(build_student(p, shapes_tokenizer))
    assert t["vision"] == s["vision"]  # one shared tower configuration
    assert t["language_model"] > 3 * s["language_model"]


def test_invalid_specs_and_unknown_preset():
    with pytest.raises(ValueError, match="head_dim"):
        LLMSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, head_dim=16)
    with pytest.raises(ValueError, match="vision"):
        VisionSpec(hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")


def test_config_is_wired_from_the_tokenizer(shapes_tokenizer):
    tok = shapes_tokenizer
    cfg = llava_config(get_preset("tiny").vision, get_preset("tiny").student, tok)
    assert cfg.image_token_index == tok.image_token_id
    assert cfg.image_seq_length == 36
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "default"
    tc = cfg.text_config
    assert tc.model_type == "qwen3" and tc.vocab_size == len(tok)
    assert (tc.pad_token_id, tc.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert tc.hidden_size // tc.num_attention_heads == tc.head_dim == 32
    assert isinstance(AutoModelForImageTextToText.from_config(cfg), LlavaForConditionalGeneration)
    padded = llava_config(get_preset("tiny").vision, get_preset("tiny").student, tok, vocab_multiple=64)
    assert padded.text_config.vocab_size == 448 and len(tok) == 413


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_processor_expands_image_and_model_trains_on_it(shapes_tokenizer, family):
    tok = shapes_tokenizer
    b = image_text_batch(tok)
    assert (b["input_ids"] == tok.image_token_id).sum(1).tolist() == [36, 36]
    assert b["pixel_values"].shape == (2, 3, 48, 48)
    p = get_preset("tiny")
    model = build_llava(p.vision, dataclasses.replace(p.student, family=family), tok)
    labels = b["input_ids"].masked_fill(b["input_ids"] == tok.image_token_id, -100)
    out = model(**b, labels=labels)
    assert out.logits.shape == (*b["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_seeded_builds_are_reproducible_and_leave_global_rng_alone(shapes_tokenizer):
    p = get_preset("tiny")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_student(p, shapes_tokenizer, seed=1).state_dict()
    assert torch.equal(torch.rand(1), before)
    b = build_student(p, shapes_tokenizer, seed=1).state_dict()
    c = build_student(p, shapes_tokenizer, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.multi_modal_projector.linear_1.weight"], c["model.multi_modal_projector.linear_1.weight"])


def test_copy_vision_tower(shapes_tokenizer):
    p = get_preset("tiny")
    teacher = build_teacher(p, shapes_tokenizer, seed=1)
    student = build_student(p, shapes_tokenizer, seed=2)
    copy_vision_tower(teacher, student)
    t, s = teacher.model.vision_tower.state_dict(), student.model.vision_tower.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t)
    other = build_llava(get_preset("small").vision, p.student, shapes_tokenizer)
    with pytest.raises(RuntimeError):
        copy_vision_tower(teacher, other)
