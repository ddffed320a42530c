"""Router statistics collected by hooks: load sums to 1, losses equal the shared formulas and keep their graph."""
import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from student.losses.moe_aux import load_balancing_loss, router_z_loss
from student.model import RouterRecorder, build_student, get_preset, upcycle
from model_inputs import image_text_batch


@pytest.fixture(scope="module")
def moe(shapes_tokenizer):
    return upcycle(build_student(get_preset("tiny"), shapes_tokenizer), 4, 2, layers="all", router_std=0.5)


def test_per_layer_load_sums_to_one_and_losses_match_the_shared_formulas(moe, shapes_tokenizer):
    b = image_text_batch(shapes_tokenizer)
    mask = b["attention_mask"].bool()
    with RouterRecorder(moe) as rec:
        moe(**b)
        st = rec.stats(token_mask=b["attention_mask"])
    assert [s.layer for s in st.layers] == [0, 1] and (st.num_experts, st.top_k) == (4, 2)
    tokens = b["input_ids"].numel()
    logits = [rec.logits[i] for i in (0, 1)]
    assert all(lg.shape == (tokens, 4) for lg in logits)
    for s, lg in zip(st.layers, logits):
        assert s.expert_fraction.shape == (4,)
        assert s.expert_fraction.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < s.entropy <= np.log(4) + 1e-6
        assert torch.allclose(s.aux_loss, load_balancing_loss([lg], 4, 2, mask.reshape(-1)))
        assert torch.allclose(s.z_loss, router_z_loss([lg], mask.reshape(-1)))
    assert torch.allclose(st.aux_loss, load_balancing_loss(logits, 4, 2, mask.reshape(-1)))
    # ... which is what Qwen-MoE itself would report, had Llava not dropped it
    ref = load_balancing_loss_func(tuple(logits), 4, 2, b["attention_mask"])
    assert torch.allclose(st.aux_loss, ref, atol=1e-6)
    log = st.to_log()
    assert sum(log[f"router/layer0/expert{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-6)


def test_padding_rows_are_ignored(moe, shapes_tokenizer):
    b = image_text_batch(shapes_tokenizer)
    mask = b["attention_mask"].reshape(-1).bool()
    with RouterRecorder(moe) as rec:
        moe(**b)
        st = rec.stats(token_mask=b["attention_mask"])
    kept = rec.logits[0][mask]
    from student.losses.moe_aux import expert_load

    assert torch.allclose(st.layers[0].expert_fraction, expert_load([kept], 4, 2))
    ent = -(kept.softmax(-1) * kept.log_softmax(-1)).sum(-1).mean()
    assert st.layers[0].entropy == pytest.approx(ent.item(), rel=1e-5)


def test_aux_loss_keeps_its_graph_so_routers_train(moe, shapes_tokenizer):
    moe.zero_grad(set_to_none=True)
    with RouterRecorder(moe) as rec:
        moe(**image_text_batch(shapes_tokenizer))
        st = rec.stats()
    (st.aux_loss + st.z_loss).backward()
    for i in (0, 1):
        assert moe.model.language_model.layers[i].mlp.gate.weight.grad.abs().sum() > 0
    moe.zero_grad(set_to_none=True)


def test_hooks_come_off_and_dense_models_say_so(moe, shapes_tokenizer):
    rec = RouterRecorder(moe)
    with rec:
        assert all(len(r._forward_hooks) == 1 for r in rec.routers.values())
    assert all(len(r._forward_hooks) == 0 for r in rec.routers.values())
    with pytest.raises(RuntimeError, match="no router logits"):
        RouterRecorder(moe).stats()
    dense = RouterRecorder(build_student(get_preset("tiny"), shapes_tokenizer))
    assert not dense.has_routers
    with pytest.raises(RuntimeError, match="no MoE routers"):
        dense.stats()
