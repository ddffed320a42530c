"""Teacher annotation: an async Ray Data actor-pool stage that attaches the teacher's outputs to rows.

What a stage needs from the teacher follows from its LossSpec (`annotation_plan`):

* kd > 0: top-k log-probs + tail mass at `select_mask(loss.kd_positions)` (KL, LLaVA-MoD);
* res / vis > 0: the same at the "mdist" positions, response | visual (LLaVA-KD MDist);
* rel > 0: the visual relation matrix y_v y_v^T (LLaVA-KD RDist);
* the preference stage: summed log-probs of the chosen and rejected responses (the DPO reference);
* teacher / init / sft: nothing (no annotation stage at all).

Positions are written as `teacher_positions` in x[mask] row-major order, so the collate's
teacher_mask lines up with them. Each actor keeps at most `max_in_flight` requests outstanding
(and Ray Data bounds the batches queued between stages), so annotation runs ahead of training
without unbounded memory. Hits come from the teacher-output cache (`actors.cache`); a request the
teacher refuses (TeacherRequestError) rejects its row; a teacher that stays unavailable after the
client's retries stops the run.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from actors import columns as C
from actors.blocks import rows_to_table, table_rows
from actors.cache import CacheKey, CacheMissError, TeacherCache, content_hash
from actors.recipe import LossSpec
from actors.rejects import RejectRateExceeded, RowReject, reject

__all__ = ["AnnotationPlan", "annotation_plan", "AnnotateConfig", "row_positions", "row_hash", "row_requests",
           "teacher_columns", "Annotator", "TEACHER_FREE_STAGES"]

TEACHER_FREE_STAGES = ("teacher", "init", "sft")


@dataclass(frozen=True)
class AnnotationPlan:
    """What to ask the teacher for, per row."""

    positions: tuple[str, ...] = ()  # mask kinds (student.losses.positions), unioned
    relation: bool = False
    preference: bool = False
    top_k: int = 64

    def signature(self) -> str:
        return f"pos={'|'.join(self.positions)};rel={int(self.relation)};pref={int(self.preference)};k={self.top_k}"


def annotation_plan(stage: str, loss: LossSpec, top_k: int = 64) -> AnnotationPlan | None:
    """The stage's teacher needs from its loss weights, or None when it needs no teacher."""
    if stage in TEACHER_FREE_STAGES:
        return None
    if stage == "preference":
        return AnnotationPlan(preference=True, top_k=top_k)
    kinds = []
    if loss.kd > 0:
        kinds.append(loss.kd_positions)
    if loss.res > 0 or loss.vis > 0:
        kinds.append("mdist")
    plan = AnnotationPlan(positions=tuple(dict.fromkeys(kinds)), relation=loss.rel > 0, top_k=top_k)
    return plan if plan.positions or plan.relation else None


def row_positions(row: dict, kinds: tuple[str, ...], image_token_id: int) -> np.ndarray:
    """int32 positions of the union of `kinds` masks for one row, in order."""
    import torch

    from student.losses.positions import select_mask

    ids = torch.as_tensor(np.asarray(row[C.INPUT_IDS], dtype=np.int64))[None]
    labels = torch.as_tensor(np.asarray(row[C.LABELS], dtype=np.int64))[None]
    attn = torch.as_tensor(np.asarray(row[C.ATTENTION_MASK], dtype=np.int64))[None]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for kind in kinds:
        mask |= select_mask(kind, labels=labels, input_ids=ids, attention_mask=attn, image_token_id=image_token_id)
    return np.flatnonzero(mask[0].numpy()).astype(np.int32)


def _scored(labels) -> np.ndarray:
    return np.asarray(labels) != C.IGNORE_INDEX


def row_hash(row: dict, plan: AnnotationPlan, positions: np.ndarray | None) -> str:
    """The cache key of one row's request inputs."""
    pv = np.asarray(row[C.PIXEL_VALUES], dtype=np.float32)
    if plan.preference:
        return content_hash([("plan", plan.signature()), ("pixel_values", pv),
                             ("chosen", np.asarray(row[C.CHOSEN_INPUT_IDS], np.int32)),
                             ("chosen_scored", _scored(row[C.CHOSEN_LABELS])),
                             ("rejected", np.asarray(row[C.REJECTED_INPUT_IDS], np.int32)),
                             ("rejected_scored", _scored(row[C.REJECTED_LABELS]))])
    return content_hash([("plan", plan.signature()), ("pixel_values", pv),
                         ("input_ids", np.asarray(row[C.INPUT_IDS], np.int32)), ("positions", positions)])


def row_requests(row: dict, plan: AnnotationPlan, positions: np.ndarray | None) -> list:
    """The ScoreRequests one row needs: one, or two (chosen, rejected) for preference rows."""
    from teacher_service.protocol import make_request

    pv = np.asarray(row[C.PIXEL_VALUES], dtype=np.float32)[None]
    if plan.preference:
        return [make_request(row[ids], pixel_values=pv, top_k=0, sequence_mask=_scored(row[labels]), request_id=f"{row[C.ID]}:{which}")
                for which, ids, labels in (("chosen", C.CHOSEN_INPUT_IDS, C.CHOSEN_LABELS),
                                           ("rejected", C.REJECTED_INPUT_IDS, C.REJECTED_LABELS))]
    has_rows = positions is not None and len(positions) > 0
    return [make_request(row[C.INPUT_IDS], positions=positions if has_rows else None, pixel_values=pv,
                         top_k=plan.top_k if has_rows else 0, relation=plan.relation, request_id=str(row[C.ID]))]


def entry_from_responses(plan: AnnotationPlan, positions, responses: list) -> dict:
    """A cache entry (also the source of the row's teacher columns) from the teacher's responses."""
    if plan.preference:
        return {"chosen_logp": float(responses[0].sequence_logprob), "rejected_logp": float(responses[1].sequence_logprob),
                "positions": None, "topk_ids": None, "topk_logprobs": None, "tail_logmass": None, "relation": None}
    r = responses[0]
    entry = {"positions": None, "topk_ids": None, "topk_logprobs": None, "tail_logmass": None, "relation": None,
             "chosen_logp": None, "rejected_logp": None}
    if plan.positions:
        if r.topk_ids is None or r.topk_ids.shape[0] != len(positions):
            got = None if r.topk_ids is None else r.topk_ids.shape
            raise RuntimeError(f"teacher answered top-k of shape {got} for {len(positions)} positions")
        entry.update(positions=np.asarray(positions, np.int32), topk_ids=np.asarray(r.topk_ids, np.int32),
                     topk_logprobs=np.asarray(r.topk_logprobs, np.float16),
                     tail_logmass=np.asarray(r.tail_logmass, np.float32))
    if plan.relation:
        entry["relation"] = np.asarray(r.relation, np.float32)[0]
    return entry


def teacher_columns(plan: AnnotationPlan, entry: dict, key: CacheKey) -> dict:
    """The `actors.columns` teacher columns of one row."""
    out = {C.TEACHER_MODEL_ID: key.teacher_model_id, C.TEACHER_TOKENIZER_HASH: key.tokenizer_hash}
    if plan.preference:
        out[C.TEACHER_CHOSEN_LOGP] = np.float32(entry["chosen_logp"])
        out[C.TEACHER_REJECTED_LOGP] = np.float32(entry["rejected_logp"])
        return out
    if plan.positions:
        out[C.TEACHER_POSITIONS] = np.asarray(entry["positions"], np.int32)
        out[C.TEACHER_TOPK_IDS] = np.asarray(entry["topk_ids"], np.int32)
        out[C.TEACHER_TOPK_LOGPROBS] = np.asarray(entry["topk_logprobs"], np.float16)
        out[C.TEACHER_TAIL_LOGMASS] = np.asarray(entry["tail_logmass"], np.float32)
    if plan.relation:
        out[C.TEACHER_RELATION] = np.asarray(entry["relation"], np.float32)
    return out


def teacher_column_names(plan: AnnotationPlan) -> list[str]:
    names = [C.TEACHER_MODEL_ID, C.TEACHER_TOKENIZER_HASH]
    if plan.preference:
        return names + [C.TEACHER_CHOSEN_LOGP, C.TEACHER_REJECTED_LOGP]
    if plan.positions:
        names += [C.TEACHER_POSITIONS, C.TEACHER_TOPK_IDS, C.TEACHER_TOPK_LOGPROBS, C.TEACHER_TAIL_LOGMASS]
    if plan.relation:
        names.append(C.TEACHER_RELATION)
    return names


@dataclass(frozen=True)
class AnnotateConfig:
    plan: AnnotationPlan
    key: CacheKey  # who the teacher must be (checked on every response by the client)
    image_token_id: int
    app_name: str = "teacher"
    cache_dir: str | None = None
    cache_mode: str = "hybrid"
    max_in_flight: int = 8  # requests outstanding per actor
    timeout_s: float = 120.0
    retries: int = 3
    extra: dict = field(default_factory=dict)


class Annotator:
    """Ray Data async actor-pool UDF: preprocessed numpy batches -> the same rows + teacher columns."""

    OP = "annotate"

    def __init__(self, config: AnnotateConfig, ledger=None):
        self.config = config
        self.ledger = ledger
        mode = config.cache_mode if config.cache_dir else "off"
        self.cache = TeacherCache(config.cache_dir or ".", config.key, mode).open()
        self.teacher_column_names = teacher_column_names(config.plan)
        self._client = None
        self._sem: asyncio.Semaphore | None = None
        self._retries_reported = 0  # the client's retries already counted in the ledger

    @property
    def client(self):
        if self._client is None:
            from teacher_service.client import TeacherClient

            k = self.config.key
            self._client = TeacherClient(self.config.app_name, timeout_s=self.config.timeout_s, retries=self.config.retries,
                                         expect_model_id=k.teacher_model_id, expect_tokenizer_hash=k.tokenizer_hash)
        return self._client

    async def _score_row(self, row: dict, positions) -> dict:
        from teacher_service.errors import TeacherRequestError

        if self._sem is None:
            self._sem = asyncio.Semaphore(self.config.max_in_flight)
        responses = []
        for req in row_requests(row, self.config.plan, positions):
            async with self._sem:
                try:
                    responses.append(await self.client.ascore(req))
                except TeacherRequestError as e:  # this row's request is bad; the teacher keeps serving
                    raise RowReject("teacher_rejected", str(e)) from None
        return entry_from_responses(self.config.plan, positions, responses)

    async def __call__(self, batch: dict[str, np.ndarray]):
        plan, cfg = self.config.plan, self.config
        rows = table_rows(batch)
        positions = [None if plan.preference or not plan.positions else row_positions(r, plan.positions, cfg.image_token_id)
                     for r in rows]
        hashes = [row_hash(r, plan, p) for r, p in zip(rows, positions)]
        hits = await asyncio.to_thread(self.cache.lookup, hashes)
        todo: dict[str, int] = {}  # content hash -> first row needing the teacher (repeats share one call)
        for i, h in enumerate(hashes):
            if h not in hits:
                todo.setdefault(h, i)
        if todo and self.cache.mode == "read":
            first = rows[next(iter(todo.values()))][C.ID]
            raise CacheMissError(f"cache_mode=read: row {first!r} (and {len(todo) - 1} more in this batch) "
                                 f"is not in the teacher cache {cfg.cache_dir}")
        results = await asyncio.gather(*(self._score_row(rows[i], positions[i]) for i in todo.values()),
                                       return_exceptions=True)
        entries, refused, fresh = dict(hits), {}, []
        for (h, i), res in zip(todo.items(), results):
            if isinstance(res, RowReject):
                refused[h] = res
            elif isinstance(res, BaseException):
                raise res  # teacher unavailable / wrong teacher / a bug: stop, do not reject silently
            else:
                entries[h] = res
                fresh.append({"content_hash": h, "id": str(rows[i][C.ID]), **res})
        if fresh:
            await asyncio.to_thread(self.cache.write, fresh)
        out_rows, rejects = [], []
        for r, h in zip(rows, hashes):
            if h in entries:
                out_rows.append({**r, **teacher_columns(plan, entries[h], cfg.key)})
            else:
                rejects.append(reject(r[C.ID], None, refused[h]))
        if self.ledger is not None:
            retries = (self._client.stats()["retries"] if self._client is not None else 0) - self._retries_reported
            self._retries_reported += retries  # re-sent teacher calls (a dead replica, a full queue, timeouts)
            stop = await self.ledger.record.remote(self.OP, len(rows), len(out_rows), rejects,
                                                   {"cache_hits": len(rows) - len(todo), "teacher_rows": len(todo),
                                                    "teacher_retries": retries})
            if stop:
                raise RejectRateExceeded(stop)
        return rows_to_table(out_rows, list(batch) + [c for c in self.teacher_column_names if c not in batch])
