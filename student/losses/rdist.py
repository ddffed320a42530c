"""Relation distillation (LLaVA-KD RDist, Eq. 4-5): L_rel = 1 - cos(R_s, R_t), R = y_v y_v^T.

y_v are the raw logits at the N_p visual positions of one sample, so R is the N_p x N_p matrix of
dot products between visual tokens' output logits, and the cosine is over the flattened matrices.
The teacher computes its R_t itself (`relation_matrix`) and ships N_p^2 numbers instead of N_p x V
logits (576^2 = 0.33 M vs 576 x 151936 = 87.5 M). Cosine is scale-invariant, so the teacher may send
R_t / ||R_t|| to keep fp16 in range (raw entries reach ~1e8).

The student's R_s is built over vocab chunks, R = sum_c y_c y_c^T with y_c = h W_c^T + b_c, by a
custom autograd.Function that recomputes each chunk in backward (dy_c = (dR + dR^T) y_c) and writes
grad(W_c) straight into one buffer: neither [N_p, V] fp32 logits nor a per-chunk [V, H] gradient
ever exist (slicing W per chunk under plain autograd would allocate a full-size grad(W) per chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .chunked import CHUNK_BYTES, check_head, check_vocab

__all__ = ["relation_matrix", "rdist_loss"]


def _chunk(visual: Tensor, w: Tensor | None, b: Tensor | None, s: int, e: int) -> Tensor:
    """Logits of vocab columns s..e, upcast: [.., Np, e - s]."""
    y = visual[..., s:e] if w is None else F.linear(visual, w[s:e], None if b is None else b[s:e])
    return y.to(torch.promote_types(y.dtype, torch.float32))


class _Relation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visual, w, b, vocab, step):
        r = None
        for s in range(0, vocab, step):
            y = _chunk(visual, w, b, s, min(s + step, vocab))
            r = y @ y.transpose(-1, -2) if r is None else r.add_(y @ y.transpose(-1, -2))
        ctx.save_for_backward(visual, w, b)
        ctx.vocab, ctx.step = vocab, step
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, dr):
        visual, w, b = ctx.saved_tensors
        want = ctx.needs_input_grad[:3]
        g = dr + dr.transpose(-1, -2)  # d/dy of <dR, y y^T> is (dR + dR^T) y
        acc = g.dtype
        gv = torch.zeros(visual.shape, dtype=acc, device=visual.device) if want[0] else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if w is not None and want[1] else None
        gb = torch.zeros(b.shape, dtype=acc, device=b.device) if b is not None and want[2] else None
        flat = visual.reshape(-1, visual.shape[-1]).to(acc) if gw is not None else None
        for s in range(0, ctx.vocab, ctx.step):
            e = min(s + ctx.step, ctx.vocab)
            dy = g @ _chunk(visual, w, b, s, e)  # [.., Np, c]
            if w is None:
                if gv is not None:
                    gv[..., s:e] = dy
                continue
            if gv is not None:
                gv += dy @ w[s:e].to(acc)
            if gw is not None:
                gw[s:e] = dy.reshape(-1, e - s).t() @ flat
            if gb is not None:
                gb[s:e] = dy.reshape(-1, e - s).sum(0)
        cast = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
        return cast(gv, visual), cast(gw, w), cast(gb, b), None, None


def relation_matrix(
    visual: Tensor,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    vocab_chunk: int | None = None,
) -> Tensor:
    """R = y_v y_v^T in fp32: [Np, Np] or [B, Np, Np].

    visual: visual-position logits [(B,) Np, V], or hidden states [(B,) Np, H] with lm_head_weight [V, H].
    Columns at or beyond vocab_size (a padded vocab) are left out, i.e. masked.
    """
    if visual.dim() not in (2, 3):
        raise ValueError(f"visual: expected [Np, D] or [B, Np, D], got shape {tuple(visual.shape)}")
    width = check_head("visual", visual, lm_head_weight, lm_head_bias)
    vocab = check_vocab(vocab_size, width)
    rows = visual.shape[-2] * (visual.shape[0] if visual.dim() == 3 else 1)
    step = vocab_chunk or max(1, CHUNK_BYTES // (4 * max(rows, 1)))
    return _Relation.apply(visual, lm_head_weight, lm_head_bias, vocab, step)


def rdist_loss(
    student_visual: Tensor,
    teacher_relation: Tensor,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    vocab_chunk: int | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """1 - cos(R_s, R_t), averaged over the batch of images.

    student_visual: the student's visual-position logits [(B,) Np, V], or hidden states [(B,) Np, H]
    with lm_head_weight. teacher_relation: R_t [(B,) Np, Np] (any float dtype; a constant).
    """
    if student_visual.dim() not in (2, 3):
        raise ValueError(f"student_visual: expected [Np, D] or [B, Np, D], got shape {tuple(student_visual.shape)}")
    np_ = student_visual.shape[-2]
    want = (*student_visual.shape[:-2], np_, np_)
    if tuple(teacher_relation.shape) != want:
        raise ValueError(f"teacher_relation: expected shape {want} (one Np x Np matrix per image), got {tuple(teacher_relation.shape)}")
    rs = relation_matrix(student_visual, lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias, vocab_size=vocab_size, vocab_chunk=vocab_chunk)
    rs = rs.flatten(-2)
    rt = teacher_relation.detach().to(rs.dtype).flatten(-2)
    cos = (rs * rt).sum(-1) / (rs.norm(dim=-1) * rt.norm(dim=-1)).clamp_min(eps)
    return (1.0 - cos).mean()
