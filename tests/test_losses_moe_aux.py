"""MoE auxiliaries against transformers' Qwen3-MoE load_balancing_loss_func and hand values."""
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from student.losses import expert_load, load_balancing_loss, router_z_loss


def _layers(n_layers=3, tokens=10, experts=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, experts, generator=g) * 2 for _ in range(n_layers)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_equals_transformers_reference(top_k):
    layers = _layers()
    ref = load_balancing_loss_func(tuple(layers), num_experts=4, top_k=top_k)
    assert torch.allclose(load_balancing_loss(layers, 4, top_k), ref, atol=1e-6)
    assert torch.allclose(load_balancing_loss(torch.stack(layers), 4, top_k), ref, atol=1e-6)


def test_equals_transformers_reference_with_padding_mask():
    layers = _layers(tokens=12)  # batch 2 x seq 6
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    ref = load_balancing_loss_func(tuple(layers), num_experts=4, top_k=2, attention_mask=attn)
    got = load_balancing_loss(layers, 4, 2, token_mask=attn.bool().reshape(-1))
    assert torch.allclose(got, ref, atol=1e-6)


def test_uniform_router_gives_top_k_and_gradient_flows_through_probs():
    # equal logits: P_e = 1/E; f_e = k/E when assignments are balanced (rows rotate their winner)
    x = torch.zeros(8, 4)
    x[torch.arange(8), torch.arange(8) % 4] = 1e-4
    x[torch.arange(8), (torch.arange(8) + 1) % 4] = 1e-4
    assert load_balancing_loss([x], 4, 2).item() == pytest.approx(2.0, rel=1e-3)
    logits = _layers(seed=1)[0].requires_grad_()
    load_balancing_loss([logits], 4, 2).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
    lse = [torch.log(torch.tensor(2.0)), torch.logsumexp(torch.tensor([1.0, 2.0]), 0), torch.logsumexp(torch.tensor([3.0, -1.0]), 0)]
    expect = sum(v.item() ** 2 for v in lse) / 3
    assert router_z_loss([x]).item() == pytest.approx(expect, rel=1e-6)
    # masked: mean over kept tokens only, across two identical layers
    m = torch.tensor([True, False, True])
    expect_m = (lse[0].item() ** 2 + lse[2].item() ** 2) / 2
    assert router_z_loss(torch.stack([x, x]), token_mask=m).item() == pytest.approx(expect_m, rel=1e-6)


def test_gradcheck_fp64():
    layers = torch.stack(_layers(n_layers=2, tokens=5, experts=3)).double().requires_grad_()
    mask = torch.tensor([True, True, False, True, True])
    assert torch.autograd.gradcheck(lambda x: load_balancing_loss(x, 3, 2, token_mask=mask), (layers,))
    assert torch.autograd.gradcheck(lambda x: router_z_loss(x, token_mask=mask), (layers,))


def test_expert_load_sums_to_one():
    load = expert_load(_layers(), 4, 2)
    assert load.shape == (4,) and load.sum().item() == pytest.approx(1.0)


def test_validation():
    layers = _layers()
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(layers, 5, 2)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(layers, 4, 5)
    with pytest.raises(ValueError, match="token_mask"):
        load_balancing_loss(layers, 4, 2, token_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="router_logits"):
        load_balancing_loss([], 4, 2)
    with pytest.raises(ValueError, match="router_logits"):
        router_z_loss([torch.zeros(3, 4), torch.zeros(2, 4)])
