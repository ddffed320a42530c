"""Backend-independent scoring math: from teacher logits to what the protocol ships.

All of it runs in fp32 whatever the model dtype (logits are upcast per chunk of rows), so the top-k
log-probs, the tail mass and the target log-probs are as exact as fp32 allows before the final cast
to the wire dtype. Rows are processed in chunks so no [N, V] fp32 tensor exists for a long sequence.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["RowScores", "score_rows", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk: 64 MiB (110 rows at V = 151936)

Project = Callable[[Tensor], Tensor]  # rows [n, D] -> logits [n, V_model]


class RowScores:
    """Per-row results of `score_rows`, as NumPy arrays in the wire dtypes."""

    __slots__ = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs")

    def __init__(self, topk_ids=None, topk_logprobs=None, tail_logmass=None, target_logprobs=None):
        self.topk_ids, self.topk_logprobs = topk_ids, topk_logprobs
        self.tail_logmass, self.target_logprobs = tail_logmass, target_logprobs


def score_rows(
    rows: Tensor,
    project: Project,
    *,
    vocab_size: int,
    top_k: int = 0,
    targets: Tensor | None = None,
    logprobs_dtype: np.dtype = np.float16,
    chunk_rows: int | None = None,
) -> RowScores:
    """Top-k ids / log-probs, the log of the mass outside the top-k, and log p(targets) for N rows.

    rows: [N, D] inputs of `project` (final hidden states, or logits with project = identity).
    Only the first `vocab_size` logits take part (a padded vocab is masked, never sliced silently
    into the distribution). tail_logmass = logsumexp over the complement of the top-k minus the full
    logsumexp, in fp32 from the logits; -inf when k = vocab_size.
    """
    n = rows.shape[0]
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(vocab_size, 1))
    ids_out, lp_out, tail_out, tgt_out = [], [], [], []
    for s in range(0, n, step):
        z = project(rows[s : s + step])
        if z.shape[-1] < vocab_size:
            raise ValueError(f"the model emits {z.shape[-1]} logits, fewer than the tokenizer's {vocab_size} tokens")
        z = z[:, :vocab_size].float()
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
        if top_k:
            lp, ids = logp.topk(top_k, dim=-1, sorted=True)
            tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
            ids_out.append(ids)
            lp_out.append(lp)
            tail_out.append(tail)
        if targets is not None:
            tgt_out.append(logp.gather(1, targets[s : s + step, None].long()).squeeze(1))
    def cat(xs: list[Tensor], shape: tuple[int, ...], dtype) -> np.ndarray:
        # N = 0 still yields arrays of the right rank, so callers never special-case empty requests.
        return torch.cat(xs).cpu().numpy().astype(dtype, copy=False) if xs else np.zeros(shape, dtype)

    out = RowScores()
    if top_k:
        out.topk_ids = cat(ids_out, (0, top_k), np.int32)
        out.topk_logprobs = cat(lp_out, (0, top_k), logprobs_dtype)
        out.tail_logmass = cat(tail_out, (0,), np.float32)
    if targets is not None:
        out.target_logprobs = cat(tgt_out, (0,), np.float32)
    return out
