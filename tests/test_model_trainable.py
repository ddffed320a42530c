"""Per-stage trainable parameters: hand-computed counts, and one AdamW step touches only the selection."""
import dataclasses

import pytest
import torch

from student.model import (
    STAGES,
    apply_trainable,
    build_llava,
    get_preset,
    trainable_parameter_names,
    upcycle,
)
from student.model.router_stats import RouterRecorder
from model_inputs import image_text_batch

E, K = 4, 2


def moe_student(tok, family):
    p = get_preset("tiny")
    dense = build_llava(p.vision, dataclasses.replace(p.student, family=family), tok)
    return upcycle(dense, E, K, layers="every_other", shared_expert_intermediate_size=64, router_std=0.5)


def hand_counts(tok, family):
    """Parameter counts per group, from the preset's dims (not from the model)."""
    p = get_preset("tiny")
    v, s = p.vision, p.student
    n_pos = v.num_patches + 1
    vis_layer = 4 * (v.hidden_size**2 + v.hidden_size) + 2 * 2 * v.hidden_size + 2 * v.hidden_size * v.intermediate_size + v.intermediate_size + v.hidden_size
    vision = 3 * v.patch_size**2 * v.hidden_size + v.hidden_size + n_pos * v.hidden_size + 2 * 2 * v.hidden_size + v.num_layers * vis_layer
    H, I = s.hidden_size, s.intermediate_size
    projector = (v.hidden_size * H + H) + (H * H + H)
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attn = H * q + 2 * H * kv + q * H + 2 * H  # q,k,v,o + two RMSNorms
    if family == "qwen3":
        attn += 2 * s.head_dim  # q_norm, k_norm
    else:
        attn += q + 2 * kv  # q/k/v biases
    ffn = 3 * H * I
    moe = E * ffn + E * H + (3 * H * 64 + H if family == "qwen2" else 0)  # experts + router (+ shared expert, its gate)
    n_moe = len(range(0, s.num_layers, 2))
    ffns = n_moe * moe + (s.num_layers - n_moe) * ffn
    llm = 2 * len(tok) * H + H + s.num_layers * attn + ffns  # embed + lm_head (untied) + final norm + layers
    return {"vision": vision, "projector": projector, "llm": llm, "ffn": ffns}


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_counts_per_stage(shapes_tokenizer, family):
    model = moe_student(shapes_tokenizer, family)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    c = hand_counts(shapes_tokenizer, family)
    assert sum(sizes.values()) == c["vision"] + c["projector"] + c["llm"]
    expected = {
        "init": c["projector"],
        "dpt": c["projector"],
        "d2d": c["projector"] + c["llm"],
        "sft": c["projector"] + c["llm"],
        "dft": c["projector"] + c["llm"],
        "teacher": c["projector"] + c["llm"],
        "d2s": c["projector"] + c["ffn"],
        "preference": c["projector"] + c["ffn"],
    }
    assert set(expected) == set(STAGES)
    for stage, n in expected.items():
        names = trainable_parameter_names(model, stage)
        assert sum(sizes[x] for x in names) == n, stage
        assert not any("vision_tower" in x for x in names), stage  # towers stay frozen in every stage


def test_d2s_selects_experts_routers_and_projector_by_name(shapes_tokenizer):
    names = trainable_parameter_names(moe_student(shapes_tokenizer, "qwen2"), "d2s")
    lm = "model.language_model.layers"
    assert f"{lm}.0.mlp.experts.gate_up_proj" in names and f"{lm}.0.mlp.gate.weight" in names
    assert f"{lm}.0.mlp.shared_expert.down_proj.weight" in names and f"{lm}.0.mlp.shared_expert_gate.weight" in names
    assert f"{lm}.1.mlp.gate_proj.weight" in names  # dense FFN of a non-MoE layer trains too (LLaVA-MoD: mlp.*)
    assert "model.multi_modal_projector.linear_2.bias" in names
    assert not any(".self_attn." in n or "embed_tokens" in n or n.startswith("lm_head") or "norm" in n for n in names)


def test_pure_and_strict(shapes_tokenizer):
    model = moe_student(shapes_tokenizer, "qwen3")
    trainable_parameter_names(model, "init")
    assert all(p.requires_grad for p in model.parameters())  # selection alone changes nothing
    names = [n for n, _ in model.named_parameters()]
    assert trainable_parameter_names(names, "d2s") == trainable_parameter_names(model, "d2s")
    with pytest.raises(ValueError, match="d2s") as err:
        trainable_parameter_names(model, "pretrain")
    assert all(s in str(err.value) for s in STAGES)
    with pytest.raises(ValueError, match="mystery"):
        trainable_parameter_names(["mystery.weight"], "d2s")


@pytest.mark.parametrize("stage", STAGES)
def test_one_adamw_step_changes_exactly_the_selected_parameters(shapes_tokenizer, stage):
    torch.manual_seed(0)
    model = moe_student(shapes_tokenizer, "qwen2").train()
    selected = apply_trainable(model, stage)
    assert selected == {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    b = image_text_batch(shapes_tokenizer)
    labels = b["input_ids"].masked_fill((b["attention_mask"] == 0) | (b["input_ids"] == shapes_tokenizer.image_token_id), -100)
    with RouterRecorder(model) as rec:
        out = model(**b, labels=labels)
        loss = out.loss + 0.01 * rec.stats(b["attention_mask"]).aux_loss
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    with_grad = {n for n, p in after.items() if p.grad is not None and p.grad.abs().max() > 0}
    assert changed, stage
    assert changed <= selected, sorted(changed - selected)[:5]
    assert with_grad <= selected and with_grad <= changed, sorted(with_grad - changed)[:5]
    if stage in ("d2s", "preference"):  # the aux loss reaches every router
        assert {n for n in selected if n.endswith("mlp.gate.weight")} <= changed
