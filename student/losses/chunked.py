"""Losses over selected positions, computed a chunk of rows at a time.

A [N, V] fp32 logit tensor at V = 151936 costs 0.6 MB per row, so the full-batch version (plus its
softmax and gradient) is what runs a distillation step out of memory. Here the student's logits exist
only for `chunk_size` rows at a time, upcast to fp32 inside the chunk:

* scalar losses (KD, CE) use `chunked_loss`: a custom autograd.Function that, in forward, computes
  each chunk's loss *and* its gradient w.r.t. that chunk's logits (local autograd on the small
  graph), then folds the gradient into grad(hidden) [N, H] and grad(W) [V, H] at once. Nothing of
  size [N, V] survives a chunk, there is no recomputation, and backward only rescales the stored
  gradients by the incoming scalar. (The Liger-Kernel "fused linear" idea, written with autograd.)
* per-row values that are not summed straight away (sequence log-probs for DPO) use
  `chunked_row_values`: torch.utils.checkpoint per chunk, which recomputes the chunk in backward.

Inputs are either logits [M, V] or hidden states [M, H] plus an lm_head weight [V, H] (+ bias [V]),
with an optional `rows` index selecting N of the M rows. `vocab` limits the softmax to the first
`vocab` columns, which is exactly masking the padded columns to -inf: they get probability 0 and
gradient 0. Teacher tensors are constants (captured by the row function); no gradient reaches them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["chunked_loss", "chunked_row_values", "ce_loss", "auto_chunk_size", "IGNORE_INDEX"]

IGNORE_INDEX = -100
# One fp32 [chunk, V] buffer is kept near this size; a chunk's loss makes a handful of them.
CHUNK_BYTES = 64 * 2**20

# (fp32 logits [c, vocab] of rows start..end of the selection, start, end) -> per-row values [c]
RowFn = Callable[[Tensor, int, int], Tensor]


def auto_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 [rows, vocab] buffer stays near `budget_bytes` (>= 1)."""
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(x: Tensor, weight: Tensor | None, bias: Tensor | None, idx: Tensor | None, s: int, e: int, vocab: int):
    """(input rows of the chunk, fp32 logits [c, vocab]) for selected rows s..e."""
    xc = x[s:e] if idx is None else x.index_select(0, idx[s:e])
    if weight is None:
        z = xc[:, :vocab]
    else:
        z = F.linear(xc, weight[:vocab], None if bias is None else bias[:vocab])
    return xc, z.to(_compute_dtype(z.dtype))


def _loop(x, weight, bias, idx, row_fn: RowFn, vocab: int, chunk_size: int, want: tuple[bool, bool, bool]):
    """Sum of row_fn over all selected rows, plus gradients of that sum for the inputs in `want`."""
    n = x.shape[0] if idx is None else idx.numel()
    gx = torch.zeros_like(x) if want[0] else None
    gw = None
    if want[1]:  # rows < vocab are written by the first chunk's addmm (beta=0); padded rows stay 0
        gw = torch.empty(weight.shape, dtype=_compute_dtype(weight.dtype), device=weight.device)
        gw[vocab:].zero_()
        if n == 0:
            gw.zero_()
    gb = torch.zeros(bias.shape, dtype=_compute_dtype(bias.dtype), device=bias.device) if want[2] else None
    total = torch.zeros((), dtype=_compute_dtype(x.dtype), device=x.device)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        xc, z = _chunk_logits(x, weight, bias, idx, s, e, vocab)
        if not any(want):
            total += row_fn(z, s, e).sum()
            continue
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            loss = row_fn(z, s, e).sum()
            (dz,) = torch.autograd.grad(loss, z)
        total += loss.detach()
        if weight is None:  # logits input: the gradient is dz itself
            if want[0]:
                dzc = dz.to(gx.dtype)
                if idx is None:
                    gx[s:e, :vocab] = dzc
                else:
                    gx[:, :vocab].index_add_(0, idx[s:e], dzc)
            continue
        if want[0]:
            dxc = dz.to(weight.dtype) @ weight[:vocab]
            if idx is None:
                gx[s:e] = dxc
            else:
                gx.index_add_(0, idx[s:e], dxc.to(gx.dtype))
        if want[1]:
            gw[:vocab].addmm_(dz.t(), xc.to(gw.dtype), beta=0 if s == 0 else 1)  # in place: no [V, H] temporary
        if want[2]:
            gb[:vocab] += dz.sum(0).to(gb.dtype)
    return total, gx, gw, gb


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, idx, row_fn, vocab, chunk_size, scale):
        want = tuple(ctx.needs_input_grad[:3])
        total, gx, gw, gb = _loop(x, weight, bias, idx, row_fn, vocab, chunk_size, want)
        # The gradients are results, kept as plain attributes so backward can scale them in place and
        # hand them over (autograd then adopts them as .grad: no second [V, H] copy of grad(W)).
        ctx.grads = [gx, gw, gb]
        ctx.save_for_backward(x, weight, bias, idx)
        ctx.args = (row_fn, vocab, chunk_size, want)
        ctx.scale = scale
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward (retain_graph, gradcheck): recompute, the first one used them up
            x, weight, bias, idx = ctx.saved_tensors
            _, *grads = _loop(x, weight, bias, idx, *ctx.args)
        g = g * ctx.scale
        dtypes = [t.dtype if t is not None else None for t in ctx.saved_tensors[:3]]
        out = [None if t is None else t.mul_(g.to(t.dtype)).to(d) for t, d in zip(grads, dtypes)]
        return (*out, None, None, None, None, None)


def chunked_loss(
    x: Tensor,
    row_fn: RowFn,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    rows: Tensor | None = None,
    vocab: int | None = None,
    chunk_size: int | None = None,
    scale: float = 1.0,
) -> Tensor:
    """scale * sum over selected rows of row_fn(fp32 logits of the chunk), with chunked grads.

    x: logits [M, V] (weight None) or hidden states [M, H] (weight [V, H]); rows: int64 [N] into M.
    """
    v_full = x.shape[-1] if weight is None else weight.shape[0]
    vocab = v_full if vocab is None else vocab
    chunk_size = chunk_size or auto_chunk_size(vocab)
    needs = [t is not None and t.requires_grad for t in (x, weight, bias)]
    if torch.is_grad_enabled() and any(needs):
        return _ChunkedLoss.apply(x, weight, bias, rows, row_fn, vocab, chunk_size, scale)
    total, *_ = _loop(x, weight, bias, rows, row_fn, vocab, chunk_size, (False, False, False))
    return total * scale


def chunked_row_values(
    x: Tensor,
    row_fn: RowFn,
    *,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    rows: Tensor | None = None,
    vocab: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """row_fn over selected rows as a differentiable [N] tensor; each chunk is recomputed in backward."""
    v_full = x.shape[-1] if weight is None else weight.shape[0]
    vocab = v_full if vocab is None else vocab
    chunk_size = chunk_size or auto_chunk_size(vocab)
    n = x.shape[0] if rows is None else rows.numel()

    def one(x_, w_, b_, s: int, e: int) -> Tensor:
        return row_fn(_chunk_logits(x_, w_, b_, rows, s, e, vocab)[1], s, e)

    out = []
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        if torch.is_grad_enabled():
            out.append(checkpoint(one, x, weight, bias, s, e, use_reentrant=False))
        else:
            out.append(one(x, weight, bias, s, e))
    if not out:
        return x.new_zeros(0, dtype=_compute_dtype(x.dtype))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Shared argument handling for the public losses (kd, ce, sequence log-probs).


def flatten_selection(name: str, student: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(rows of student as [M, D], int64 index of the selected rows or None for all).

    A 3-D student [B, T, D] needs a bool mask [B, T]; rows are taken in row-major order, which is
    the order of `x[mask]` and the order teacher signals must come in.
    """
    if student.dim() == 2:
        if mask is not None:
            raise ValueError(f"mask: only used with a [B, T, D] {name}; {name} is already [N, D] (selected rows)")
        return student, None
    if student.dim() != 3:
        raise ValueError(f"{name}: expected [N, D] or [B, T, D], got shape {tuple(student.shape)}")
    if mask is None:
        raise ValueError(f"mask: required when {name} is [B, T, D] (which positions to score)")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(student.shape[:2]):
        raise ValueError(f"mask: expected bool {tuple(student.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    return student.reshape(-1, student.shape[-1]), mask.reshape(-1).nonzero().squeeze(1)


def check_head(name: str, student: Tensor, weight: Tensor | None, bias: Tensor | None) -> int:
    """Validate the (hidden, lm_head) pair and return the student's full vocab width."""
    if weight is None:
        if bias is not None:
            raise ValueError("lm_head_bias: given without lm_head_weight")
        return student.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != student.shape[-1]:
        raise ValueError(
            f"lm_head_weight: expected [V, H={student.shape[-1]}] to match {name}'s hidden size, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"lm_head_bias: expected [{weight.shape[0]}], got {tuple(bias.shape)}")
    return weight.shape[0]


def check_vocab(vocab_size: int | None, student_width: int, teacher_width: int | None = None) -> int:
    """The vocab the softmax runs over. Different widths need an explicit vocab_size (never sliced silently)."""
    widths = {"student": student_width} | ({} if teacher_width is None else {"teacher": teacher_width})
    if vocab_size is None:
        if teacher_width is not None and teacher_width != student_width:
            raise ValueError(
                f"vocab_size: student has {student_width} logits per row but teacher has {teacher_width}; "
                "pass vocab_size=<tokenizer vocab> to mask the padded columns"
            )
        return student_width
    if not 0 < vocab_size <= min(widths.values()):
        raise ValueError(f"vocab_size: must be in [1, {min(widths.values())}] given widths {widths}, got {vocab_size}")
    return vocab_size


def ce_loss(
    student: Tensor,
    targets: Tensor,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy at selected positions, chunked (same engine as the KD loss).

    student: logits [N, V] / [B, T, V], or hidden [N, H] / [B, T, H] with lm_head_weight [V, H].
    targets: int [N] or [B, T], aligned with the student rows, i.e. already next-token shifted
    (see positions.shift_labels). Rows equal to ignore_index are skipped; "mean" averages over the
    rest (0 when none are left, so a batch without response tokens does not produce NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    width = check_head("student", student, lm_head_weight, lm_head_bias)
    vocab = check_vocab(vocab_size, width)
    if tuple(targets.shape) != tuple(student.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(student.shape[:-1])} to match student rows, got {tuple(targets.shape)}")
    x, rows = flatten_selection("student", student, mask)
    flat_t = targets.reshape(-1)
    sel_t = flat_t if rows is None else flat_t[rows]
    keep = sel_t != ignore_index
    if not bool(keep.all()):  # drop ignored rows; otherwise keep plain slicing (no index_select copies)
        rows = (torch.arange(x.shape[0], device=x.device) if rows is None else rows)[keep]
    tgt = sel_t[keep].long()
    if tgt.numel() and (tgt.min() < 0 or tgt.max() >= vocab):
        raise ValueError(f"targets: values must be in [0, {vocab}) or {ignore_index}, got range [{int(tgt.min())}, {int(tgt.max())}]")

    def row_fn(z: Tensor, s: int, e: int) -> Tensor:
        return torch.logsumexp(z, dim=-1) - z.gather(1, tgt[s:e, None]).squeeze(1)

    n = tgt.numel()
    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    return chunked_loss(x, row_fn, weight=lm_head_weight, bias=lm_head_bias, rows=rows, vocab=vocab, chunk_size=chunk_size, scale=scale)
