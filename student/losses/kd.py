"""Token-level distillation: forward KL, reverse KL and JSD between teacher and student next-token
distributions at selected positions (LLaVA-MoD Eq. 6; LLaVA-KD L_res / L_vis, Eq. 2-3).

The teacher signal is one of two frozen dataclasses:

* FullTeacher(logprobs [N, V]): full-vocab log-probs (or logits; they are renormalised anyway).
* TopKTeacher(ids [N, k], logprobs [N, k], tail_logmass [N]): what the teacher service and the
  cache ship (int32 ids, fp16 log-probs are fine; every chunk is upcast to fp32).

Tail choice (a "tail bucket"). A top-k teacher says nothing about how its remaining mass
exp(tail_logmass) is spread over the other V - k tokens, so neither distribution is compared there
token by token. Both are collapsed onto k + 1 outcomes: the k teacher ids, and one bucket holding
everything else. The student's bucket is its exact mass outside the k ids (a logsumexp over the
complement); the teacher's is exp(tail_logmass). The divergence is then the ordinary one between
these two (k+1)-outcome distributions. Consequences:
  - k = V: the bucket is empty on both sides, so the loss *is* the full loss (a finite tail the
    teacher reports because its fp16 log-probs do not sum to one is ignored: no token lies outside).
  - k < V: by the data-processing inequality the bucket KL is a lower bound on the full KL; it never
    invents a shape for the teacher's tail (no "zero tail", which would make forward KL ignore
    missing mass, and no "uniform tail", which pushes mass onto junk tokens).
  - The teacher's k + 1 log-masses are renormalised (log_softmax), so fp16 rounding in the shipped
    log-probs cannot make the teacher sum to more or less than one.

Temperature tau divides the student's logits before its softmax (over the full vocab, then bucketed)
and the teacher's log-probs before its softmax. For a full teacher that is the usual p^(1/tau)
renormalised. For a top-k teacher it is applied to the k + 1 bucket log-masses: exact for the
top-k entries relative to each other, while the tail bucket is tempered as if it were one token
(the true tempered tail, sum over tail tokens of p_i^(1/tau), is unknown). With k = V the tail
bucket is empty, so top-k reproduces the full loss at every tau; at tau = 1 the bucket loss is exact
for any k. The loss is *not* multiplied by tau^2; put that into the weight if you want Hinton's
gradient scale.

JSD with mixing coefficient beta: M = beta * p_T + (1 - beta) * p_S and
JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M); beta = 0.5 is the symmetric JSD. It
vanishes at beta = 0 or 1, so beta must lie strictly inside (0, 1).

Padded vocabularies: pass vocab_size (the tokenizer's vocab) and both softmaxes run over the first
vocab_size columns only, i.e. the columns beyond it are masked to -inf. Widths that differ without
vocab_size are an error, never a silent slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import check_head, check_vocab, chunked_loss, flatten_selection

__all__ = ["KD_KINDS", "FullTeacher", "TopKTeacher", "Teacher", "divergence", "kd_loss"]

KD_KINDS = ("forward", "reverse", "jsd")


@dataclass(frozen=True)
class FullTeacher:
    """Full-vocab teacher log-probs (or logits) [N, V] at the N selected positions."""

    logprobs: Tensor

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 2 or not self.logprobs.is_floating_point():
            raise ValueError(f"FullTeacher.logprobs: expected a float [N, V] tensor, got {self.logprobs.dtype} {tuple(self.logprobs.shape)}")

    @property
    def num_rows(self) -> int:
        return self.logprobs.shape[0]


@dataclass(frozen=True)
class TopKTeacher:
    """Teacher top-k: ids [N, k] (int32/int64), logprobs [N, k], tail_logmass [N] = log(1 - sum exp(logprobs))."""

    ids: Tensor
    logprobs: Tensor
    tail_logmass: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TopKTeacher.ids: expected int32/int64 [N, k], got {self.ids.dtype} {tuple(self.ids.shape)}")
        if tuple(self.logprobs.shape) != tuple(self.ids.shape) or not self.logprobs.is_floating_point():
            raise ValueError(
                f"TopKTeacher.logprobs: expected float {tuple(self.ids.shape)} like ids, got {self.logprobs.dtype} {tuple(self.logprobs.shape)}"
            )
        if tuple(self.tail_logmass.shape) != (self.ids.shape[0],) or not self.tail_logmass.is_floating_point():
            raise ValueError(
                f"TopKTeacher.tail_logmass: expected float [{self.ids.shape[0]}], got {self.tail_logmass.dtype} {tuple(self.tail_logmass.shape)}"
            )

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def from_logprobs(cls, ids: Tensor, logprobs: Tensor) -> "TopKTeacher":
        """Derive tail_logmass = log(1 - sum exp(logprobs)); -inf when the top-k already hold all the mass."""
        lse = torch.logsumexp(logprobs.to(torch.promote_types(logprobs.dtype, torch.float32)), dim=-1)
        tail = torch.where(lse < 0, torch.log(-torch.expm1(lse.clamp_max(-1e-30))), float("-inf"))
        return cls(ids, logprobs, tail)

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: Tensor, k: int, vocab_size: int | None = None) -> "TopKTeacher":
        """Top-k of a full teacher (tests, caches). The tail is the exact mass outside the top-k."""
        vocab = logits.shape[-1] if vocab_size is None else vocab_size
        logp = F.log_softmax(logits[:, :vocab].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        lp, ids = logp.topk(k, dim=-1)
        tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
        return cls(ids, lp, tail)


Teacher = FullTeacher | TopKTeacher


def _plogq_diff(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) per row, with 0 log 0 = 0 (and no NaN gradient from it)."""
    p = logp.exp()
    pos = p > 0
    diff = torch.where(pos, logp, 0.0) - torch.where(pos, logq, 0.0)
    return (p * diff).sum(dim=-1)


def divergence(teacher_logp: Tensor, student_logp: Tensor, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """Per-row divergence [rows] between two normalised log-distributions over the last dim.

    forward = KL(p_T || p_S) (mode covering; LLaVA-MoD), reverse = KL(p_S || p_T) (mode seeking;
    MiniLLM), jsd = beta*KL(p_T||M) + (1-beta)*KL(p_S||M) with M = beta*p_T + (1-beta)*p_S.
    """
    if kind == "forward":
        return _plogq_diff(teacher_logp, student_logp)
    if kind == "reverse":
        return _plogq_diff(student_logp, teacher_logp)
    if kind == "jsd":
        # Where both are -inf (the empty tail bucket at k = V) neither term contributes; feed logaddexp
        # zeros there so its backward does not produce exp(-inf - -inf) = NaN.
        dead = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
        a, b = torch.where(dead, 0.0, teacher_logp), torch.where(dead, 0.0, student_logp)
        logm = torch.logaddexp(a + math.log(beta), b + math.log1p(-beta))
        return beta * _plogq_diff(teacher_logp, logm) + (1 - beta) * _plogq_diff(student_logp, logm)
    raise ValueError(f"kind: expected one of {KD_KINDS}, got {kind!r}")


def _check_teacher_rows(teacher: Teacher, n: int) -> None:
    if teacher.num_rows != n:
        name = "teacher.logprobs" if isinstance(teacher, FullTeacher) else "teacher.ids"
        raise ValueError(f"{name}: has {teacher.num_rows} rows but {n} student positions are selected")


def _check_topk(teacher: TopKTeacher, vocab: int) -> None:
    if teacher.k > vocab:
        raise ValueError(f"teacher.ids: k={teacher.k} exceeds vocab {vocab}")
    if teacher.num_rows == 0:
        return
    lo, hi = int(teacher.ids.min()), int(teacher.ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"teacher.ids: values must be in [0, {vocab}), got range [{lo}, {hi}] (padded-vocab id from the teacher?)")
    if bool(torch.isnan(teacher.tail_logmass).any()):
        raise ValueError("teacher.tail_logmass: contains NaN (log of a negative tail? clamp 1 - sum at 0 -> -inf)")
    if teacher.k > 1:
        srt = teacher.ids.sort(dim=-1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("teacher.ids: repeated id within a row; top-k ids must be distinct")


def kd_loss(
    student: Tensor,
    teacher: Teacher,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    mask: Tensor | None = None,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Distillation loss at the selected positions, chunked over rows with an fp32 upcast per chunk.

    student: logits [N, V], or hidden states [N, H] with lm_head_weight [V, H] (+ lm_head_bias [V]).
    A [B, T, D] student takes a bool mask [B, T]; the teacher then has one row per True, row-major.
    reduction: "mean" over positions (0 for an empty selection) or "sum".
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kind: expected one of {KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"beta: the JSD mixing coefficient must be in (0, 1), got {beta}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    if not isinstance(teacher, (FullTeacher, TopKTeacher)):
        raise ValueError(f"teacher: expected FullTeacher or TopKTeacher, got {type(teacher).__name__}")

    width = check_head("student", student, lm_head_weight, lm_head_bias)
    x, rows = flatten_selection("student", student, mask)
    n = x.shape[0] if rows is None else rows.numel()
    _check_teacher_rows(teacher, n)
    tau = float(temperature)

    def soften(v: Tensor) -> Tensor:  # no [c, V] copy at tau = 1
        return v if tau == 1.0 else v / tau

    if isinstance(teacher, FullTeacher):
        vocab = check_vocab(vocab_size, width, teacher.logprobs.shape[1])
        t_all = teacher.logprobs

        def row_fn(z: Tensor, s: int, e: int) -> Tensor:
            t = F.log_softmax(soften(t_all[s:e, :vocab].to(z.dtype)), dim=-1)
            return divergence(t, F.log_softmax(soften(z), dim=-1), kind, beta)

    else:
        vocab = check_vocab(vocab_size, width)
        _check_topk(teacher, vocab)
        # k = V: the bucket is empty on both sides, whatever (fp16-rounded) tail the teacher reports.
        # Keep it a constant -inf: a logsumexp over nothing has a NaN gradient.
        full = teacher.k == vocab

        def row_fn(z: Tensor, s: int, e: int) -> Tensor:
            ids = teacher.ids[s:e].long()
            logq = F.log_softmax(soften(z), dim=-1)
            q_top = logq.gather(1, ids)
            if full:
                q_tail = t_tail = q_top.new_full((e - s, 1), float("-inf"))
            else:
                q_tail = torch.logsumexp(logq.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
                t_tail = teacher.tail_logmass[s:e, None].to(z.dtype)
            t = torch.cat([teacher.logprobs[s:e].to(z.dtype), t_tail], dim=1)
            return divergence(F.log_softmax(soften(t), dim=-1), torch.cat([q_top, q_tail], dim=1), kind, beta)

    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    return chunked_loss(x, row_fn, weight=lm_head_weight, bias=lm_head_bias, rows=rows, vocab=vocab, chunk_size=chunk_size, scale=scale)
