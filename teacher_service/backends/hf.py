"""The `hf` backend: a frozen Hugging Face image-text-to-text model (transformers), on CPU or GPU.

One padded forward per batch (right padding, so real tokens keep their positions and never attend
to padding), then per-request slicing. For models whose logits are a plain linear head over the
final hidden states (Llava and most LLaVA-style teachers) the head is applied only to the rows a
request asks for, so no [B, T, V] logits tensor is ever built; other models fall back to the full
forward's logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from teacher_service.backends.base import TeacherBackend, with_pixel_values
from teacher_service.identity import model_id as checkpoint_model_id
from teacher_service.identity import tokenizer_hash
from teacher_service.protocol import Limits, ScoreRequest, ScoreResponse, TeacherInfo
from teacher_service.scoring import score_rows

__all__ = ["HFBackend"]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}") from None


class HFBackend(TeacherBackend):
    """model: a local checkpoint directory (what `student.model.export` writes)."""

    name = "hf"

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        model_id: str | None = None,
        torch_threads: int | None = None,
        chunk_rows: int | None = None,
    ):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        from student.model.loading import load_teacher  # eval mode, frozen, MoE experts on grouped_mm

        self.model, self.processor = load_teacher(model, dtype=self.dtype)
        self.model.to(self.device)
        self.chunk_rows = chunk_rows
        tok = self.processor.tokenizer
        cfg = self.model.config
        image_token_id = getattr(cfg, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(cfg, "image_token_index", None)
        if image_token_id is None:
            image_token_id = tok.image_token_id
        image_seq_length = getattr(cfg, "image_seq_length", None) or getattr(self.processor, "num_image_tokens", None)
        if not image_seq_length:
            raise ValueError(f"{model}: cannot tell how many image tokens one image takes (config.image_seq_length)")
        vcfg = getattr(cfg, "vision_config", None)
        image_shape = None
        if vcfg is not None and getattr(vcfg, "image_size", None):
            size = vcfg.image_size
            image_shape = (int(getattr(vcfg, "num_channels", 3)), int(size), int(size))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.info = TeacherInfo(
            model_id=model_id or checkpoint_model_id(model),
            tokenizer_hash=tokenizer_hash(tok),
            backend=self.name,
            vocab_size=len(tok),
            image_token_id=int(image_token_id),
            image_seq_length=int(image_seq_length),
            image_shape=image_shape,
            pad_token_id=int(pad),
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
        )
        head = self.model.get_output_embeddings()
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        plain = isinstance(head, nn.Linear) and not getattr(text_cfg, "final_logit_softcapping", None)
        plain = plain and hasattr(self.model, "model") and not getattr(text_cfg, "logit_scale", None)
        self._head = head if plain else None

    # -- per request -------------------------------------------------------------------------
    def prepare(self, request: ScoreRequest, limits: Limits) -> ScoreRequest:
        """Decode encoded images into pixel_values with the teacher's own image processor."""
        return with_pixel_values(request, limits, self.processor.image_processor)

    # -- batched -----------------------------------------------------------------------------
    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self._head is None else F.linear(rows, self._head.weight, self._head.bias)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """[B, T, D]: final hidden states (plain linear head) or logits (anything else)."""
        kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
        if self._head is not None:
            return self.model.model(**kw).last_hidden_state
        return self.model(**kw).logits

    @torch.inference_mode()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        lens = [r.num_tokens for r in requests]
        t = max(lens)
        ids = torch.full((len(requests), t), self.info.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(requests), t), dtype=torch.long)
        pixels = []
        for i, r in enumerate(requests):
            ids[i, : lens[i]] = torch.from_numpy(r.input_ids.astype(np.int64))  # astype copies: writable
            mask[i, : lens[i]] = 1
            if r.pixel_values is not None and r.pixel_values.shape[0]:
                pixels.append(torch.tensor(r.pixel_values))  # copy: object-store arrays are read-only
        pv = torch.cat(pixels).to(self.device, self.dtype) if pixels else None
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self._forward(ids, mask, pv)
        return [self._respond(r, x[i, : lens[i]], ids[i, : lens[i]]) for i, r in enumerate(requests)]

    def _respond(self, r: ScoreRequest, x: torch.Tensor, ids: torch.Tensor) -> ScoreResponse:
        from student.losses import relation_matrix

        info = self.info
        out: dict = {}
        if r.positions is not None and (r.top_k or r.target_ids is not None):
            # The logits at t predict token t+1: positions[i] = t selects row t, as select_mask does.
            pos = torch.from_numpy(r.positions.astype(np.int64)).to(x.device)
            tgt = None if r.target_ids is None else torch.from_numpy(r.target_ids.astype(np.int64)).to(x.device)
            s = score_rows(
                x[pos], self._project, vocab_size=info.vocab_size, top_k=r.top_k, targets=tgt,
                logprobs_dtype=np.dtype(r.logprobs_dtype), chunk_rows=self.chunk_rows,
            )
            out.update(topk_ids=s.topk_ids, topk_logprobs=s.topk_logprobs, tail_logmass=s.tail_logmass, target_logprobs=s.target_logprobs)
        if r.sequence_mask is not None:
            # log p(input_ids[t] | < t) comes from the logits at t - 1 (sequence_mask[0] is rejected).
            t = torch.from_numpy(np.flatnonzero(r.sequence_mask)).to(x.device)
            s = score_rows(x[t - 1], self._project, vocab_size=info.vocab_size, targets=ids[t], chunk_rows=self.chunk_rows)
            out["sequence_logprob"] = float(s.target_logprobs.astype(np.float64).sum())
        if r.relation:
            vis = (ids == info.image_token_id).nonzero().squeeze(1).reshape(-1, info.image_seq_length)
            head = {} if self._head is None else {"lm_head_weight": self._head.weight, "lm_head_bias": self._head.bias}
            rel = relation_matrix(x[vis], vocab_size=info.vocab_size, **head).float()  # [n_images, Np, Np]
            if r.relation_dtype == "float16":
                rel = rel / rel.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
            out["relation"] = rel.cpu().numpy().astype(r.relation_dtype)
        return ScoreResponse(model_id=info.model_id, tokenizer_hash=info.tokenizer_hash, request_id=r.request_id, **out)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
