"""MoE router auxiliaries: load balancing (Switch Transformer / Qwen-MoE) and router z-loss (ST-MoE).

`load_balancing_loss` equals `transformers.models.qwen3_moe.modeling_qwen3_moe.load_balancing_loss_func`
(transformers 5.2x): f_e and P_e are pooled over all layers and (unmasked) tokens *before* the product,

    loss = E * sum_e f_e * P_e,
    f_e  = (# top-k assignments to expert e) / (L * tokens)     (sums to top_k over e)
    P_e  = mean router probability of expert e over the same L * tokens rows,

so a perfectly uniform router gives loss = top_k (not 1). Pooling equals the mean of per-layer
losses only when routing is identical across layers; we match the reference rather than the paper's
per-layer form so a student trained here and in transformers optimises the same number. f is a count
(no gradient); the gradient flows through P only, as in Switch.

Router logits are upcast to (at least) fp32: softmax over a handful of experts is cheap, and bf16
probabilities bias both f (top-k ties) and P.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["load_balancing_loss", "router_z_loss", "expert_load"]

RouterLogits = Sequence[Tensor] | Tensor


def _stack_layers(router_logits: RouterLogits, num_experts: int | None = None) -> Tensor:
    """Return fp32 logits [L, tokens, E] from a per-layer sequence or a [L, tokens, E] / [tokens, E] tensor."""
    if isinstance(router_logits, Tensor):
        x = router_logits.unsqueeze(0) if router_logits.dim() == 2 else router_logits
        if x.dim() != 3:
            raise ValueError(f"router_logits: expected [tokens, E] or [L, tokens, E], got shape {tuple(router_logits.shape)}")
    else:
        layers = list(router_logits)
        if not layers:
            raise ValueError("router_logits: empty sequence (no MoE layers?)")
        shapes = {tuple(t.shape) for t in layers}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"router_logits: every layer must be [tokens, E] with the same shape, got {sorted(shapes)}")
        x = torch.stack(layers)
    if num_experts is not None and x.shape[-1] != num_experts:
        raise ValueError(f"router_logits: last dim is {x.shape[-1]} but num_experts={num_experts}")
    return x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; fp64 stays (gradcheck)


def _check_mask(token_mask: Tensor | None, tokens: int) -> Tensor | None:
    if token_mask is None:
        return None
    if token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask: expected a bool tensor, got {token_mask.dtype}")
    m = token_mask.reshape(-1)  # [B, S] attention masks are accepted, flattened row-major like the logits
    if m.numel() != tokens:
        raise ValueError(f"token_mask: has {m.numel()} elements but router_logits has {tokens} tokens per layer")
    return m


def _assignment_fraction(x: Tensor, num_experts: int, top_k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(f [E], P [E]) pooled over layers and kept tokens. x: fp32 [L, tokens, E]."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    probs = x.softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # [L, tokens, k]
    counts = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)  # [L, tokens, E], k ones per row
    if mask is not None:
        w = mask.to(probs.dtype)[None, :, None]
        counts, probs = counts * w, probs * w
        rows = mask.sum() * x.shape[0]
    else:
        rows = x.shape[0] * x.shape[1]
    rows = torch.as_tensor(rows, dtype=probs.dtype, device=probs.device).clamp_min(1.0)  # no tokens -> 0, not NaN
    return counts.sum(dim=(0, 1)) / rows, probs.sum(dim=(0, 1)) / rows


def load_balancing_loss(
    router_logits: RouterLogits,
    num_experts: int,
    top_k: int,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Switch/Qwen load-balancing loss, E * sum_e f_e * P_e pooled over layers (see module docstring).

    router_logits: per-layer [tokens, E] tensors (the MoE layers only) or one [L, tokens, E] tensor.
    token_mask: bool [tokens] (or [B, S] flattening to it); False rows (padding) are ignored.
    """
    x = _stack_layers(router_logits, num_experts)
    f, p = _assignment_fraction(x, num_experts, top_k, _check_mask(token_mask, x.shape[1]))
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: RouterLogits, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over layers and kept tokens of logsumexp(router logits)^2.

    Keeps router logits small so the softmax stays in a well-conditioned range in bf16.
    """
    x = _stack_layers(router_logits)
    z2 = torch.logsumexp(x, dim=-1).square()  # [L, tokens]
    mask = _check_mask(token_mask, x.shape[1])
    if mask is None:
        return z2.mean()
    kept = (mask.sum() * x.shape[0]).clamp_min(1)
    return (z2 * mask.to(z2.dtype)[None, :]).sum() / kept


@torch.no_grad()
def expert_load(
    router_logits: RouterLogits,
    num_experts: int,
    top_k: int,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Fraction of top-k assignments per expert, pooled over layers, [E] summing to 1 (for logging).

    Uniform routing gives 1/E everywhere; a collapsed router shows up here long before in the aux loss.
    """
    x = _stack_layers(router_logits, num_experts)
    f, _ = _assignment_fraction(x, num_experts, top_k, _check_mask(token_mask, x.shape[1]))
    return f / top_k
