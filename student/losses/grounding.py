"""Grounding loss: attention of an answer word's predicting position on the image tokens it is about.

L = mean over (layer, query) of -log(sum of head h's attention from the query to its target keys).
Used by the embedded teacher (targets from `actors.shapes.grounding`): CE alone leaves a small LM's
object lookup leaky, so "where is X?" names a neighbour of X (docs/training.md, "Grounding").
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grounding_loss"]

EPS = 1e-6


def grounding_loss(attentions: list[Tensor] | tuple[Tensor, ...], rows: Tensor, queries: Tensor, targets: Tensor,
                   head: int = 0) -> Tensor:
    """attentions: per supervised layer, softmaxed weights [B, H, T, T]; rows, queries: [N] (batch row and
    query position of each target); targets: [N, T] bool, the keys each query should attend to.
    Returns the mean negative log attention mass on the targets (0 when N == 0)."""
    if targets.shape[0] == 0 or not attentions:
        return attentions[0].new_zeros(()) if attentions else torch.zeros(())
    if rows.shape != queries.shape or targets.shape[0] != rows.shape[0]:
        raise ValueError(f"rows {tuple(rows.shape)}, queries {tuple(queries.shape)} and targets "
                         f"{tuple(targets.shape)} must describe the same N queries")
    if not targets.any(-1).all():
        raise ValueError("every grounded query needs at least one target key")
    losses = []
    for attn in attentions:
        weights = attn[rows, head, queries].float()  # [N, T]
        mass = (weights * targets).sum(-1)
        losses.append(-torch.log(mass + EPS))
    return torch.stack(losses).mean()
