"""Chunked CE and sequence log-probs against F.cross_entropy and brute-force loops."""
import pytest
import torch
import torch.nn.functional as F

from student.losses import ce_loss, select_mask, sequence_logps, shift_labels

D = torch.float64


def _rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_ce_equals_cross_entropy_values_and_grads(chunk):
    n, v, h = 9, 17, 5
    x, w, b = _rand(n, h, seed=1), _rand(v, h, seed=2), _rand(v, seed=3)
    tgt = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(4))
    tgt[2] = -100
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.cross_entropy(F.linear(*ref_leaves), tgt, ignore_index=-100)
    g_ref = torch.autograd.grad(ref, ref_leaves)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    got = ce_loss(leaves[0], tgt, lm_head_weight=leaves[1], lm_head_bias=leaves[2], chunk_size=chunk)
    g = torch.autograd.grad(got, leaves)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, atol=1e-12, rtol=0)
    s = ce_loss(F.linear(x, w, b), tgt, reduction="sum")
    assert torch.allclose(s, F.cross_entropy(F.linear(x, w, b), tgt, reduction="sum"), atol=1e-12, rtol=0)


def test_ce_at_response_mask_equals_hf_style_shifted_loss():
    """positions.select_mask('response') + shift_labels is the causal-LM loss HF computes."""
    b_, t_, v = 2, 6, 11
    logits = _rand(b_, t_, v, seed=5).requires_grad_()
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    mask = select_mask("response", labels, attention_mask=attn)
    got = ce_loss(logits, shift_labels(labels), mask=mask, chunk_size=2)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda z: ce_loss(z, shift_labels(labels), mask=mask, chunk_size=2), (logits,), fast_mode=True)


def test_ce_gradcheck_and_validation():
    x, w = _rand(4, 3, seed=6).requires_grad_(), _rand(7, 3, seed=7).requires_grad_()
    tgt = torch.tensor([1, 6, 0, 3])
    assert torch.autograd.gradcheck(lambda x, w: ce_loss(x, tgt, lm_head_weight=w, chunk_size=3), (x, w), fast_mode=True)
    with pytest.raises(ValueError, match="targets"):
        ce_loss(x, tgt[:3], lm_head_weight=w)
    with pytest.raises(ValueError, match="targets"):
        ce_loss(x, torch.tensor([1, 7, 0, 3]), lm_head_weight=w)
    with pytest.raises(ValueError, match="vocab_size"):
        ce_loss(x, tgt, lm_head_weight=w, vocab_size=8)
    # everything ignored: 0, not NaN
    assert ce_loss(x, torch.full((4,), -100), lm_head_weight=w).item() == 0.0


def _brute_seq_logps(logits, labels, average=False):
    out = []
    for b in range(labels.shape[0]):
        tot, cnt = 0.0, 0
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            tot += float(torch.log_softmax(logits[b, t - 1], -1)[y])
            cnt += 1
        out.append(tot / max(cnt, 1) if average else tot)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_loop(average):
    logits = _rand(3, 7, 10, seed=8)
    labels = torch.tensor(
        [[-100, -100, 2, 3, 4, -100, -100], [-100, 9, 0, 0, -100, -100, -100], [-100] * 7]
    )
    got = sequence_logps(logits, labels, average=average, chunk_size=3)
    assert torch.allclose(got, _brute_seq_logps(logits, labels, average), atol=1e-12, rtol=0)
    assert got[2].item() == 0.0


def test_sequence_logps_mask_hidden_path_and_gradcheck():
    h, w = _rand(2, 5, 3, seed=9).requires_grad_(), _rand(8, 3, seed=10).requires_grad_()
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    got = sequence_logps(h, labels, mask, lm_head_weight=w, chunk_size=2)
    masked = labels.masked_fill(~mask, -100)
    ref = _brute_seq_logps((h @ w.T).detach(), masked)
    assert torch.allclose(got.detach(), ref, atol=1e-12, rtol=0)
    fn = lambda h, w: sequence_logps(h, labels, mask, lm_head_weight=w, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w), fast_mode=True)
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(h, labels[:, :4], lm_head_weight=w)
    with pytest.raises(ValueError, match="mask"):
        sequence_logps(h, labels, mask.long(), lm_head_weight=w)
