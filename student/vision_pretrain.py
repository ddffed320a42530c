"""Pretrain a Llava model's vision tower on the shapes world's per-cell labels.

The papers start from a pretrained, frozen CLIP. The embedded world has none, and learning shapes
*through language* is what made from-scratch training slow (../shared/notes/shapes-world.md). The
world's grid cells are aligned with the patches, so every patch has exact labels (is there an object
in my cell, its shape, colour and size, which cell I am): linear heads on each patch's feature learn
them in seconds. What the LLM then receives is a tower whose image tokens already say what and where.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from actors.shapes.grounding import patch_cells
from actors.shapes.world import GRID

__all__ = ["VisionPretrainConfig", "LABELS", "cell_targets", "patch_features", "position_code", "pretrain_vision_tower",
           "probe_accuracy"]

# label column -> number of classes (-1 in the data = no object in that cell: ignored)
LABELS = {"cell_present": 2, "cell_shape": 4, "cell_colour": 6, "cell_size": 2}


@dataclass(frozen=True)
class VisionPretrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    cell_index: bool = True  # also predict which of the 9 cells a patch is in (position, for "where is X?")
    # Reserve the last `position_dims` features for a fixed code of the patch's cell, `position_scale`
    # times as loud as the content features: position in dimensions of its own, which a small LM learns
    # to read sooner, on most seeds, than position mixed into the content (docs/training.md).
    position_dims: int = 0
    position_scale: float = 1.0
    position_weight: float = 1.0  # of the position code's MSE against the heads' cross-entropies


def _pixels(images: list[bytes], image_mean, image_std) -> torch.Tensor:
    arrs = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) / 255.0 for b in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def cell_targets(rows: list[dict], patches_per_side: int) -> dict[str, torch.Tensor]:
    """Per-patch targets [B, P] (row-major patches) from per-cell labels [B, 9]."""
    cell_of_patch = torch.from_numpy(patch_cells(patches_per_side))  # [P]
    out = {}
    for name in LABELS:
        cells = torch.tensor([row[name] for row in rows], dtype=torch.long)  # [B, 9]
        out[name] = cells[:, cell_of_patch]
    out["cell"] = cell_of_patch.unsqueeze(0).expand(len(rows), -1)
    return out


def position_code(dims: int) -> torch.Tensor:
    """[9, dims]: each cell's row one-hot then column one-hot (how the world names a cell: "top left"),
    tiled to `dims`, centred, scaled to unit RMS."""
    rows = torch.arange(GRID * GRID) // GRID
    cols = torch.arange(GRID * GRID) % GRID
    onehot = torch.cat([F.one_hot(rows, GRID), F.one_hot(cols, GRID)], dim=1).float()  # [9, 6]
    code = onehot.repeat(1, -(-dims // onehot.shape[1]))[:, :dims]
    code = code - code.mean(0, keepdim=True)
    return code / code.pow(2).mean().sqrt().clamp_min(1e-6)


def _features(tower: nn.Module, pixel_values: torch.Tensor, num_patches: int) -> torch.Tensor:
    h = tower(pixel_values=pixel_values).last_hidden_state
    return h[:, -num_patches:]  # drop CLS when present


def pretrain_vision_tower(
    tower: nn.Module,
    images: list[dict],
    *,
    image_mean,
    image_std,
    cfg: VisionPretrainConfig = VisionPretrainConfig(),
    progress: bool = True,
) -> dict:
    """Train `tower` in place on per-patch labels; return {"steps", "seconds", "loss", "probe": accuracies}.

    `images`: one dict per distinct image with "image" (encoded bytes) and the per-cell label lists.
    """
    from tqdm.auto import tqdm

    if not images:
        raise ValueError("images: need at least one image with per-cell labels")
    missing = [k for k in LABELS if k not in images[0]]
    if missing:
        raise ValueError(f"images: rows lack per-cell label columns {missing} (only the shapes world has them)")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    hidden = tower.config.hidden_size
    side = tower.config.image_size // tower.config.patch_size
    content = hidden - cfg.position_dims  # the heads read the features before the position code
    if content <= 0:
        raise ValueError(f"position_dims {cfg.position_dims} must leave some of the tower's {hidden} features")
    heads = nn.ModuleDict({k: nn.Linear(content, n) for k, n in LABELS.items()})
    if cfg.cell_index:
        heads["cell"] = nn.Linear(content, GRID * GRID)
    code = position_code(cfg.position_dims)
    params = list(tower.parameters()) + list(heads.parameters())
    for p in tower.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    pix = _pixels([r["image"] for r in images], image_mean, image_std)
    targets = cell_targets(images, side)
    tower.train()
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    bar = tqdm(range(cfg.steps), desc="vision pretrain", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(len(images), (min(cfg.batch_size, len(images)),), generator=gen)
        h = _features(tower, pix[idx], side * side)
        loss = 0.0
        for name, head in heads.items():
            y = targets[name][idx]
            keep = y >= 0
            loss = loss + F.cross_entropy(head(h[..., :content])[keep], y[keep])
        if cfg.position_dims:  # the target follows the content's loudness, so no absolute scale to tune
            loud = h[..., :content].detach().pow(2).mean().sqrt() * cfg.position_scale
            loss = loss + cfg.position_weight * F.mse_loss(h[..., content:] / loud, code[targets["cell"][idx]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    tower.eval()
    return {"steps": cfg.steps, "seconds": round(seconds, 2), "loss": float(loss.detach()), "heads": heads}


def patch_features(tower: nn.Module, images: list[dict], *, image_mean, image_std) -> torch.Tensor:
    """[B, P, H]: the tower's output per patch (what Llava's projector receives) for rows with "image"."""
    side = tower.config.image_size // tower.config.patch_size
    return _features(tower, _pixels([r["image"] for r in images], image_mean, image_std), side * side)


@torch.no_grad()
def probe_accuracy(tower: nn.Module, heads: nn.ModuleDict, images: list[dict], *, image_mean, image_std) -> dict[str, float]:
    """Per-patch accuracy of the pretraining heads on held-out images (the tower's report card)."""
    side = tower.config.image_size // tower.config.patch_size
    targets = cell_targets(images, side)
    h = patch_features(tower, images, image_mean=image_mean, image_std=image_std)
    out = {}
    for name, head in heads.items():
        y = targets[name]
        keep = y >= 0
        logits = head(h[..., :head.in_features])
        out[name] = float((logits.argmax(-1)[keep] == y[keep]).float().mean())
    return out
