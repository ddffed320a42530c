"""The vllm backend's pure parts, in the main environment (no vLLM here; `make vllm-check` runs vLLM).

The derived text-path checkpoint is checked against the Llava model it comes from, with transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from teacher_service.backends.vllm import (
    PromptRows,
    collapse_image_tokens,
    multimodal_checkpoint,
    tail_from_topk,
    text_checkpoint,
    vllm_weight_name,
)
from teacher_service.errors import TeacherRequestError


def test_tail_from_topk_matches_the_full_distribution():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 50, generator=g, dtype=torch.float64) * 3, dim=-1)
    lp, _ = logp.topk(8, dim=-1)
    full_tail = torch.logsumexp(logp.sort(dim=-1, descending=True).values[:, 8:], dim=-1)
    np.testing.assert_allclose(tail_from_topk(lp.numpy(), 50), full_tail.numpy(), rtol=1e-6)  # the formula
    # From fp32 top-k (what vLLM returns) the error grows as the tail shrinks: ~1e-7 / tail mass.
    np.testing.assert_allclose(tail_from_topk(lp.float().numpy(), 50), full_tail.numpy(), atol=1e-4)
    assert np.isneginf(tail_from_topk(logp[:, :50].numpy(), 50)).all()  # k = vocab: nothing outside


def test_collapse_image_tokens_keeps_one_token_per_image():
    img = 7
    ids = np.array([1, img, img, img, img, img, img, 2, 3, img, img, img, 4], np.int32)
    assert collapse_image_tokens(ids, img, 3).tolist() == [1, img, img, 2, 3, img, 4]
    assert collapse_image_tokens(np.array([1, 2]), img, 3).tolist() == [1, 2]
    with pytest.raises(TeacherRequestError) as e:
        collapse_image_tokens(np.array([1, img, img, 2]), img, 3)
    assert e.value.field == "input_ids"


@dataclass
class Flat:
    """The four lists of vllm.logprobs.FlatLogprobs, as vLLM fills them (see PromptRows)."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)


def _flat_from(logp: torch.Tensor, ids: list[int], k: int) -> Flat:
    """Prompt log-probs the way vLLM lays them out: entry j = the distribution predicting token j."""
    f = Flat()
    f.start_indices.append(0)
    f.end_indices.append(0)
    for j in range(1, len(ids)):
        row = logp[j - 1]
        top_lp, top_ids = row.topk(k)
        f.start_indices.append(len(f.logprobs))
        f.token_ids += [ids[j], *top_ids.tolist()]
        f.logprobs += [float(row[ids[j]]), *top_lp.tolist()]
        f.end_indices.append(len(f.logprobs))
    return f


def test_prompt_rows_follow_the_protocol_positions():
    g = torch.Generator().manual_seed(1)
    ids = [3, 9, 4, 1, 0]  # 4 real tokens + the appended one
    logp = torch.log_softmax(torch.randn(len(ids), 12, generator=g), dim=-1)  # logp[t]: after token t
    rows = PromptRows.from_flat(_flat_from(logp, ids, 4), 4, len(ids))
    t = np.array([0, 2, 3])
    got_ids, got_lp = rows.after(t)
    want_lp, want_ids = logp[torch.as_tensor(t)].topk(4)
    assert (got_ids[:, 1:] == want_ids.numpy()).all()
    np.testing.assert_allclose(got_lp[:, 1:], want_lp.numpy(), rtol=0, atol=0)
    assert got_ids[:, 0].tolist() == [ids[1], ids[3], ids[4]]  # column 0: the token actually at t + 1
    with pytest.raises(RuntimeError, match="positions"):
        PromptRows.from_flat(_flat_from(logp, ids, 4), 4, len(ids) + 3)
    with pytest.raises(RuntimeError, match="entries per position"):
        PromptRows.from_flat(_flat_from(logp, ids, 4), 5, len(ids))


def test_vllm_weight_names():
    assert vllm_weight_name("vision_tower.embeddings.patch_embedding.weight", "clip_vision_model") == (
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    )
    assert vllm_weight_name("vision_tower.vision_model.post_layernorm.weight", "clip_vision_model") == (
        "vision_tower.vision_model.post_layernorm.weight"
    )
    assert vllm_weight_name("language_model.model.embed_tokens.weight", "clip_vision_model") == (
        "language_model.model.embed_tokens.weight"
    )


@pytest.fixture(scope="module")
def exported_teacher(tmp_path_factory, shapes_tokenizer):
    from student.model.builder import build_processor, build_teacher
    from student.model.export import export
    from student.model.presets import get_preset

    preset = get_preset("tiny")
    model = build_teacher(preset, shapes_tokenizer, seed=0).eval()
    proc = build_processor(shapes_tokenizer, preset.vision.image_size, preset.vision.patch_size)
    return model, export(model, proc, tmp_path_factory.mktemp("teacher") / "hf")


def test_text_checkpoint_is_the_llava_language_model(exported_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llava, src = exported_teacher
    dst = text_checkpoint(src, tmp_path / "text")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["vocab_size"] == llava.config.text_config.vocab_size
    lm = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32, local_files_only=True).eval()
    ids = torch.randint(3, cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llava(input_ids=ids).logits
        got = lm(input_ids=ids).logits
    assert torch.equal(got, want)
    assert len(AutoTokenizer.from_pretrained(str(dst), local_files_only=True)) == cfg["vocab_size"]
    assert text_checkpoint(src, dst) == dst  # finished: reused, not rewritten


def test_multimodal_checkpoint_renames_only_the_vision_tower(exported_teacher, tmp_path):
    from safetensors import safe_open

    _, src = exported_teacher
    dst = multimodal_checkpoint(src, tmp_path / "mm")
    with safe_open(str(src / "model.safetensors"), "pt") as a, safe_open(str(dst / "model.safetensors"), "pt") as b:
        src_keys, dst_keys = set(a.keys()), set(b.keys())
        assert {vllm_weight_name(k, "clip_vision_model") for k in src_keys} == dst_keys
        assert all(k.startswith("vision_tower.vision_model.") for k in dst_keys if k.startswith("vision_tower."))
        k = "language_model.lm_head.weight"
        assert torch.equal(a.get_tensor(k), b.get_tensor(k))
    assert (dst / "config.json").read_text() == (src / "config.json").read_text()
    assert (dst / "tokenizer.json").exists()
