"""RDist: 1 - cos(R_s, R_t), R = y y^T, against hand-computed cosines."""
import math

import pytest
import torch

from student.losses import rdist_loss, relation_matrix

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _hand_rel_loss(ys, rt):
    np_ = len(ys)
    rs = [[sum(a * b for a, b in zip(ys[i], ys[j])) for j in range(np_)] for i in range(np_)]
    dot = sum(rs[i][j] * rt[i][j] for i in range(np_) for j in range(np_))
    ns = math.sqrt(sum(v * v for row in rs for v in row))
    nt = math.sqrt(sum(v * v for row in rt for v in row))
    return 1.0 - dot / (ns * nt)


def test_relation_matrix_is_y_yT():
    y = _rand(4, 9, seed=1)
    assert torch.allclose(relation_matrix(y, vocab_chunk=2), y @ y.T, atol=1e-12, rtol=0)


def test_zero_for_equal_inputs():
    y = _rand(5, 12, seed=2)
    loss = rdist_loss(y, y @ y.T)
    assert abs(loss.item()) < 1e-12
    # and for a teacher that ships a rescaled (e.g. normalised, fp16) matrix
    r = y @ y.T
    assert abs(rdist_loss(y, (r / r.norm()).half()).item()) < 1e-3


def test_matches_hand_computed_cosine():
    ys, yt = _rand(4, 7, seed=3), _rand(4, 7, seed=4)
    rt = yt @ yt.T
    got = rdist_loss(ys, rt, vocab_chunk=3).item()
    assert got == pytest.approx(_hand_rel_loss(ys.tolist(), rt.tolist()), rel=1e-10, abs=1e-12)


def test_batched_hidden_path_equals_logits_path_and_hand_value():
    b_, np_, h, v = 2, 3, 4, 10
    hid, w, bias = _rand(b_, np_, h, seed=5), _rand(v, h, seed=6), _rand(v, seed=7)
    rt = torch.stack([(lambda y: y @ y.T)(_rand(np_, v, seed=8 + i)) for i in range(b_)])
    logits = hid @ w.T + bias
    a = rdist_loss(hid, rt, lm_head_weight=w, lm_head_bias=bias, vocab_chunk=3)
    b = rdist_loss(logits, rt)
    hand = sum(_hand_rel_loss(logits[i].tolist(), rt[i].tolist()) for i in range(b_)) / b_
    assert a.item() == pytest.approx(hand, rel=1e-10) and b.item() == pytest.approx(hand, rel=1e-10)


def test_gradcheck_fp64_and_padded_vocab():
    hid, w, bias = _rand(3, 2, seed=9).requires_grad_(), _rand(6, 2, seed=10).requires_grad_(), _rand(6, seed=11).requires_grad_()
    rt = (lambda y: y @ y.T)(_rand(3, 5, seed=12))
    fn = lambda h, w, b: rdist_loss(h, rt, lm_head_weight=w, lm_head_bias=b, vocab_chunk=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hid, w, bias))
    # batched hidden states and the logits path
    hb = _rand(2, 3, 2, seed=13).requires_grad_()
    rtb = torch.stack([rt, rt.flip(0)])
    assert torch.autograd.gradcheck(lambda h, w: rdist_loss(h, rtb, lm_head_weight=w, vocab_chunk=4), (hb, w))
    logits = _rand(2, 3, 6, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda y: rdist_loss(y, rtb, vocab_chunk=4), (logits,))
    # vocab_size=5 leaves the padded 6th row of the head out entirely
    loss = rdist_loss(hid, rt, lm_head_weight=w, lm_head_bias=bias, vocab_size=5, vocab_chunk=2)
    ref = rdist_loss((hid @ w.T + bias)[:, :5].detach(), rt)
    assert torch.allclose(loss, ref, atol=1e-12, rtol=0)
    loss.backward()
    assert (w.grad[5] == 0).all() and bias.grad[5] == 0


def test_validation():
    y = _rand(4, 6)
    with pytest.raises(ValueError, match="teacher_relation"):
        rdist_loss(y, torch.zeros(3, 3, dtype=D))
    with pytest.raises(ValueError, match="student_visual"):
        rdist_loss(y[0], torch.zeros(4, 4, dtype=D))
    with pytest.raises(ValueError, match="lm_head_weight"):
        rdist_loss(y, torch.zeros(4, 4, dtype=D), lm_head_weight=_rand(8, 5))
