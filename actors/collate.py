"""Per-batch padding: rows of `actors.columns` -> one dict of torch tensors for the trainer.

Sequences are right-padded to the longest row of the batch (not a global max: short batches stay
cheap). Teacher top-k rows are concatenated in row-major order and `teacher_mask` [B, T] marks the
positions they belong to, so `student_logits[teacher_mask]` lines up with them row for row — the
same order `student.losses.select_mask` uses.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from actors import columns as C

__all__ = ["pad_collate"]


def _rows(batch: Mapping[str, object], name: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in batch[name]]


def _pad(seqs: list[np.ndarray], value: int, dtype: torch.dtype) -> torch.Tensor:
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(np.asarray(s))
    return out


def pad_collate(batch: Mapping[str, object], pad_id: int) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch (column -> array of per-row arrays) -> padded torch tensors.

    Keeps string columns (id, task) as lists. Columns it does not know pass through as tensors when
    they stack, else as lists.
    """
    out: dict[str, object] = {}
    n = len(next(iter(batch.values())))
    for name, pad in {**C.SEQUENCE_COLUMNS, **C.PREFERENCE_COLUMNS}.items():
        if name in batch:
            value = pad_id if pad is None else pad
            dtype = torch.bool if name.endswith("_mask") and name != C.ATTENTION_MASK else torch.long
            out[name] = _pad(_rows(batch, name), value, dtype)
    if C.PIXEL_VALUES in batch:
        out[C.PIXEL_VALUES] = torch.as_tensor(np.stack(_rows(batch, C.PIXEL_VALUES))).float()
    if C.TEACHER_POSITIONS in batch:
        positions = _rows(batch, C.TEACHER_POSITIONS)
        length = out[C.INPUT_IDS].shape[1] if C.INPUT_IDS in out else max(int(p.max(initial=-1)) + 1 for p in positions)
        mask = torch.zeros((n, length), dtype=torch.bool)
        for i, p in enumerate(positions):
            if len(p) and (int(p.max()) >= length or int(p.min()) < 0):
                raise ValueError(f"{C.TEACHER_POSITIONS}: row {i} has positions outside [0, {length})")
            mask[i, torch.as_tensor(p.astype(np.int64))] = True
            if len(np.unique(p)) != len(p) or (len(p) > 1 and np.any(np.diff(p) <= 0)):
                raise ValueError(f"{C.TEACHER_POSITIONS}: row {i} positions must be strictly increasing")
        out["teacher_mask"] = mask
        for name, dtype in (
            (C.TEACHER_TOPK_IDS, torch.long),
            (C.TEACHER_TOPK_LOGPROBS, torch.float32),
            (C.TEACHER_TAIL_LOGMASS, torch.float32),
        ):
            if name in batch:
                out[name] = torch.cat([torch.as_tensor(np.array(x)).to(dtype) for x in _rows(batch, name)], dim=0)
    for name in (C.TEACHER_RELATION,):
        if name in batch:
            out[name] = torch.as_tensor(np.stack([np.array(x, dtype=np.float32) for x in _rows(batch, name)]))
    for name in (C.TEACHER_CHOSEN_LOGP, C.TEACHER_REJECTED_LOGP):
        if name in batch:
            out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.float32))
    for name in (C.ID, C.TASK, C.SUBTASK, C.TEACHER_MODEL_ID, C.TEACHER_TOKENIZER_HASH):
        if name in batch:
            out[name] = [str(x) for x in batch[name]]
    for name, value in batch.items():
        if name not in out and name not in C.SEQUENCE_COLUMNS and name not in C.PREFERENCE_COLUMNS:
            try:
                out[name] = torch.as_tensor(np.stack(_rows(batch, name)))
            except (TypeError, ValueError):
                out[name] = list(value)
    return out
