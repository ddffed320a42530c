"""Which positions a loss looks at, as bool masks [B, T] over the student's logits.

Convention (the same as causal-LM cross-entropy): the logits at position t predict token t+1. So

* "response": positions t whose *next* token is a response token (labels[t+1] != -100). These are
  exactly the positions CE is computed at, and the default KD target (LLaVA-MoD Table 7).
* "response+instruction": positions t whose next token is any real text token (response, system or
  instruction), i.e. not an image token and not padding.
* "visual": the image-token positions themselves (input_ids[t] == image_token_id), whose logits
  LLaVA-KD distils (L_vis, Eq. 3) and whose logits make the relation matrix (RDist). input_ids is
  expected *after* image-token expansion (one id per patch).
* "mdist": response | visual (LLaVA-KD MDist, Eq. 2-3, as one mask).

All kinds also require attention_mask[t] (and attention_mask[t+1] when the next token matters), so
left or right padding never leaks in. The mask selects rows in row-major order: `x[mask]`, and the
teacher's signals for the same batch must be produced in that order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .chunked import IGNORE_INDEX

__all__ = ["MASK_KINDS", "select_mask", "shift_labels"]

MASK_KINDS = ("response", "response+instruction", "visual", "mdist")


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """targets[t] = labels[t+1] (the token position t predicts); the last position gets ignore_index."""
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [B, T], got shape {tuple(labels.shape)}")
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def _next(x: Tensor, fill) -> Tensor:
    """x shifted left by one along T (x[:, t+1] at t), padded with `fill`."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def select_mask(
    kind: str,
    labels: Tensor | None = None,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    image_token_id: int | None = None,
) -> Tensor:
    """bool [B, T] mask of the positions whose logits a loss of this kind uses (see module docstring)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind: expected one of {MASK_KINDS}, got {kind!r}")
    shape = None
    for name, t in (("labels", labels), ("input_ids", input_ids), ("attention_mask", attention_mask)):
        if t is None:
            continue
        if t.dim() != 2:
            raise ValueError(f"{name}: expected [B, T], got shape {tuple(t.shape)}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from the other inputs' {shape}")
        shape = tuple(t.shape)
    if shape is None:
        raise ValueError("labels/input_ids: at least one is required")
    ref = labels if labels is not None else input_ids
    live = torch.ones(shape, dtype=torch.bool, device=ref.device) if attention_mask is None else attention_mask.bool()
    live_next = live & _next(live, False)

    def need(name: str, value):
        if value is None:
            raise ValueError(f"{name}: required for kind={kind!r}")
        return value

    def response() -> Tensor:
        return live_next & (shift_labels(need("labels", labels)) != IGNORE_INDEX)

    def visual() -> Tensor:
        return live & (need("input_ids", input_ids) == need("image_token_id", image_token_id))

    if kind == "response":
        return response()
    if kind == "visual":
        return visual()
    if kind == "mdist":
        return response() | visual()
    ids = need("input_ids", input_ids)  # response+instruction
    return live_next & (_next(ids, -1) != need("image_token_id", image_token_id))
