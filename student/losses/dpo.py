"""Preference distillation: DPO with the teacher as the reference model (LLaVA-MoD Eq. 8).

With h = [log pi_S(y+|x) - log pi_T(y+|x)] - [log pi_S(y-|x) - log pi_T(y-|x)]:

    sigmoid (DPO, default): -log sigmoid(beta * h)          (= softplus(-beta * h))
    ipo:                    (h - 1 / (2 * beta))^2           (Azar et al.; pair it with length-averaged
                                                              log-probs, sequence_logps(average=True))
    hinge (SLiC):           max(0, 1 - beta * h)

Every loss decreases as the student raises y+ and lowers y- *relative to the teacher*, which is how
the student can end up less hallucination-prone than its teacher. The teacher's sequence log-probs
arrive precomputed from the teacher service, so only the student needs logits here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import IGNORE_INDEX, check_head, check_vocab, chunked_row_values
from .positions import shift_labels

__all__ = ["DPO_KINDS", "dpo_loss", "sequence_logps"]

DPO_KINDS = ("sigmoid", "ipo", "hinge")


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    average: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum (or mean, average=True) of log p(labels[t] | < t) over the scored tokens of each sequence: [B].

    logits: [B, T, V] (or hidden states [B, T, H] with lm_head_weight [V, H]), unshifted, as the model
    returns them. labels: [B, T] aligned with input_ids, -100 where not scored; the logits at t-1
    score labels[t]. mask: optional bool [B, T] aligned with labels, further restricting the scored
    tokens (e.g. the response of a chosen/rejected pair). A sequence with no scored token gives 0.
    Rows are computed in chunks with an fp32 upcast and recomputed in backward (checkpointing).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits: expected [B, T, V] (or [B, T, H] with lm_head_weight), got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(labels.shape)):
        raise ValueError(f"mask: expected bool {tuple(labels.shape)} like labels, got {mask.dtype} {tuple(mask.shape)}")
    width = check_head("logits", logits, lm_head_weight, lm_head_bias)
    vocab = check_vocab(vocab_size, width)
    b, t = labels.shape
    targets = shift_labels(labels)
    scored = targets != IGNORE_INDEX
    if mask is not None:
        scored &= shift_labels(mask.long(), 0).bool()
    rows = scored.reshape(-1).nonzero().squeeze(1)
    tgt = targets.reshape(-1)[rows].long()
    if tgt.numel() and (tgt.min() < 0 or tgt.max() >= vocab):
        raise ValueError(f"labels: scored values must be in [0, {vocab}), got range [{int(tgt.min())}, {int(tgt.max())}]")

    def row_fn(z: Tensor, s: int, e: int) -> Tensor:
        return z.gather(1, tgt[s:e, None]).squeeze(1) - torch.logsumexp(z, dim=-1)

    x = logits.reshape(b * t, logits.shape[-1])
    per_token = chunked_row_values(x, row_fn, weight=lm_head_weight, bias=lm_head_bias, rows=rows, vocab=vocab, chunk_size=chunk_size)
    out = per_token.new_zeros(b).index_add(0, rows // t, per_token)
    if average:
        out = out / scored.sum(dim=1).clamp_min(1).to(out.dtype)
    return out


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """(mean loss, stats) for a batch of pairs; ref = the teacher's sequence log-probs (constants).

    stats (detached, batch means): chosen_rewards = beta*(pi_c - ref_c), rejected_rewards =
    beta*(pi_r - ref_r), reward_margin = their difference, reward_accuracy = fraction of pairs with
    chosen_reward > rejected_reward.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"kind: expected one of {DPO_KINDS}, got {kind!r}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    args = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps: expected [B] sequence log-probs, got shape {tuple(policy_chosen_logps.shape)}")
    for name, v in args.items():
        if tuple(v.shape) != tuple(policy_chosen_logps.shape):
            raise ValueError(f"{name}: expected shape {tuple(policy_chosen_logps.shape)} like policy_chosen_logps, got {tuple(v.shape)}")
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).square()
    else:
        losses = torch.relu(1.0 - beta * h)
    with torch.no_grad():
        cr, rj = beta * chosen, beta * rejected
        stats = {
            "chosen_rewards": cr.mean(),
            "rejected_rewards": rj.mean(),
            "reward_margin": (cr - rj).mean(),
            "reward_accuracy": (cr > rj).to(dtype).mean(),
        }
    return losses.mean(), stats
