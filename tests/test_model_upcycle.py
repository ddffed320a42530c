"""Upcycling dense Qwen3/Qwen2 Llava students into MoE: exactness, layer pattern, router init, noise."""
import dataclasses

import pytest
import torch

from student.model import build_llava, get_preset, upcycle
from student.model.upcycle import moe_layer_indices
from model_inputs import image_text_batch


def dense(tok, family="qwen3", seed=0):
    p = get_preset("tiny")
    return build_llava(p.vision, dataclasses.replace(p.student, family=family), tok, seed=seed).eval()


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
@pytest.mark.parametrize("layers", ["all", "every_other"])
def test_upcycled_logits_equal_dense(shapes_tokenizer, family, layers):
    b = image_text_batch(shapes_tokenizer)
    assert (b["attention_mask"] == 0).any()  # padding is part of the check
    model = dense(shapes_tokenizer, family)
    with torch.no_grad():
        ref = model(**b).logits
    moe = upcycle(model, num_experts=4, top_k=2, layers=layers, router_std=0.5)  # large std: routing really varies
    with torch.no_grad():
        got = moe(**b).logits
    assert (got - ref).abs().max().item() <= 1e-5

    n = model.config.text_config.num_hidden_layers
    sparse = list(range(n)) if layers == "all" else list(range(0, n, 2))
    tc = moe.config.text_config
    assert tc.model_type == f"{family}_moe" and tc.num_experts == 4 and tc.num_experts_per_tok == 2
    assert tc.norm_topk_prob and tc.decoder_sparse_step == 1
    assert tc.mlp_only_layers == [i for i in range(n) if i not in sparse]
    kinds = ["Sparse" in type(layer.mlp).__name__ for layer in moe.model.language_model.layers]
    assert [i for i, k in enumerate(kinds) if k] == sparse
    assert moe.get_experts_implementation()["text_config"] == "grouped_mm"


def test_layer_patterns():
    assert moe_layer_indices(4, "every_other") == [0, 2]
    assert moe_layer_indices(5, "every_other") == [0, 2, 4]
    assert moe_layer_indices(4, [3, 1, 1]) == [1, 3]
    with pytest.raises(ValueError):
        moe_layer_indices(4, [4])
    with pytest.raises(ValueError):
        moe_layer_indices(4, "odd")


def test_experts_are_copies_router_is_seeded_and_dense_is_untouched(shapes_tokenizer):
    model = dense(shapes_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = upcycle(model, 4, 2, seed=1)
    b = upcycle(model, 4, 2, seed=1)
    c = upcycle(model, 4, 2, seed=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mlp = model.model.language_model.layers[0].mlp
    ex = a.model.language_model.layers[0].mlp.experts
    for e in range(4):
        assert torch.equal(ex.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(ex.down_proj[e], mlp.down_proj.weight)
    gate = lambda m: m.model.language_model.layers[0].mlp.gate.weight
    assert torch.equal(gate(a), gate(b)) and not torch.equal(gate(a), gate(c))
    assert gate(a).std().item() == pytest.approx(0.02, rel=0.1)  # N(0, initializer_range) by default


def test_router_gets_no_task_gradient_at_init_unless_experts_are_noised(shapes_tokenizer):
    b = image_text_batch(shapes_tokenizer)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    model = dense(shapes_tokenizer)

    def router_grad(moe):
        moe.train()
        moe(**b, labels=labels).loss.backward()
        layer = moe.model.language_model.layers[0].mlp
        return layer.gate.weight.grad.abs().max().item(), layer.experts.gate_up_proj.grad.abs().max().item()

    exact_router, exact_experts = router_grad(upcycle(model, 4, 2, router_std=0.5))
    assert exact_experts > 1e-4 and exact_router < 1e-6 * exact_experts

    noisy = upcycle(model, 4, 2, router_std=0.5, expert_noise=0.05, seed=3)
    ex = noisy.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(ex[0], ex[1])
    assert torch.equal(ex, upcycle(model, 4, 2, router_std=0.5, expert_noise=0.05, seed=3).model.language_model.layers[0].mlp.experts.gate_up_proj)
    noisy_router, _ = router_grad(noisy)
    assert noisy_router > 1e3 * max(exact_router, 1e-12)


def test_qwen2_shared_expert_starts_silent(shapes_tokenizer):
    moe = upcycle(dense(shapes_tokenizer, "qwen2"), 4, 2, layers="all", shared_expert_intermediate_size=48)
    block = moe.model.language_model.layers[1].mlp
    assert block.shared_expert.down_proj.weight.shape == (moe.config.text_config.hidden_size, 48)
    assert block.shared_expert.down_proj.weight.abs().max() == 0


def test_refuses_bad_inputs(shapes_tokenizer):
    model = dense(shapes_tokenizer)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(model, 2, 3)
    with pytest.raises(ValueError, match="already"):
        upcycle(upcycle(model, 4, 2), 4, 2)
    with pytest.raises(TypeError):
        upcycle(model.model.language_model, 4, 2)
