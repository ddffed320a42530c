"""One training step's objective: model + collated batch + stage + LossSpec -> (loss, logged metrics).

Pure orchestration over `student.losses`: it runs the student's forward up to the final hidden
states and hands hidden states plus the lm_head weight to the chunked losses, so no fp32 [B, T, V]
logits tensor is ever built. Nothing here knows about Ray or DeepSpeed; the worker loop calls it on
`engine.module` and backpropagates the returned loss through the engine.

Which rows each term uses (positions follow `student.losses.positions`: logits at t predict t+1):
    ce            response positions                              (teacher, init, sft, d2s, dpt, dft)
    kl            LossSpec.kd_positions ("response" by default)   (d2d, d2s)
    res / vis     response / visual positions                     (dpt, dft; LLaVA-KD MDist)
    rel           visual positions of each image, vs teacher_relation (dpt, dft; RDist)
    dpo           chosen/rejected sequences in one forward, teacher logps as reference (preference)
    aux           router logits of the MoE layers (RouterRecorder), when the student is sparse
The teacher's top-k rows arrive aligned with `teacher_mask` (row-major, `actors.collate`); a term
whose positions are a subset of teacher_mask takes the matching rows, a position the teacher did not
score is an error naming `teacher_positions`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from actors import columns as C
from actors.recipe import LossSpec
from student.losses import (
    LossWeights,
    TopKTeacher,
    active_terms,
    ce_loss,
    dpo_loss,
    grounding_loss,
    kd_loss,
    rdist_loss,
    select_mask,
    sequence_logps,
    shift_labels,
    stage_loss,
)

__all__ = ["StepContext", "loss_weights", "stage_step", "forward_hidden", "grounding_term"]


@dataclass(frozen=True)
class StepContext:
    """Model facts a step needs and the batch does not carry."""

    vocab_size: int  # the tokenizer's vocab: softmaxes run over these columns only
    image_token_id: int
    pad_token_id: int
    gather_head: bool = False  # ZeRO-3: lm_head.weight is partitioned, run the head module on selected rows
    # The ground term (teacher stage, shapes world): the tokenizer's id -> word table
    # (actors.shapes.grounding.token_words) and the image's patches per side.
    ground_words: tuple[str, ...] = ()
    patches_per_side: int = 0


def loss_weights(spec: LossSpec) -> LossWeights:
    """A recipe's loss block -> the objective's weights (DPO has no weight of its own: 1)."""
    return LossWeights(ce=spec.ce, kd=spec.kd, res=spec.res, vis=spec.vis, rel=spec.rel, aux=spec.aux, dpo=1.0,
                       ground=spec.ground)


def forward_hidden(model, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None) -> Tensor:
    """Final hidden states [B, T, H] of a Llava model (its lm_head is applied inside the losses)."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
    return out.last_hidden_state


class _Head:
    """The lm_head as the chunked losses take it: (rows, weight) with weight=None meaning rows are logits.

    Normally rows are hidden states and the weight is passed along, so logits exist a chunk at a time.
    Under ZeRO-3 the weight is a partitioned placeholder outside the head's own forward, so the head
    module runs on the selected rows only ([N, V] for N selected positions, never [B, T, V]).
    """

    def __init__(self, model, ctx: StepContext):
        self.module = model.lm_head
        self.gather = ctx.gather_head
        self.bias = None if self.gather else self.module.bias

    def rows(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        x = hidden[mask]
        return (self.module(x), None) if self.gather else (x, self.module.weight)


def _teacher_rows(batch: dict, wanted: Tensor, what: str) -> TopKTeacher:
    """The teacher's top-k rows for positions `wanted` (a subset of teacher_mask), in row-major order."""
    tmask = batch.get("teacher_mask")
    if tmask is None or C.TEACHER_TOPK_IDS not in batch:
        raise ValueError(f"batch: the {what} term needs teacher top-k rows ({C.TEACHER_TOPK_IDS}, {C.TEACHER_POSITIONS}); "
                         "was the data annotated by the teacher?")
    if tuple(tmask.shape) != tuple(wanted.shape):
        raise ValueError(f"teacher_mask: shape {tuple(tmask.shape)} differs from the batch's {tuple(wanted.shape)}")
    missing = wanted & ~tmask
    if bool(missing.any()):
        b, t = missing.nonzero()[0].tolist()
        ids = batch.get(C.ID)
        row = ids[b] if ids is not None else b
        raise ValueError(f"{C.TEACHER_POSITIONS}: row {row!r} lacks teacher scores at position {t} needed by {what} "
                         f"({int(missing.sum())} positions missing in the batch)")
    index = (tmask.reshape(-1).long().cumsum(0) - 1)[wanted.reshape(-1)]
    return TopKTeacher(batch[C.TEACHER_TOPK_IDS][index], batch[C.TEACHER_TOPK_LOGPROBS][index],
                       batch[C.TEACHER_TAIL_LOGMASS][index])


def _kd(head: _Head, hidden: Tensor, batch: dict, mask: Tensor, spec: LossSpec, ctx: StepContext, what: str) -> Tensor:
    rows, weight = head.rows(hidden, mask)
    return kd_loss(rows, _teacher_rows(batch, mask, what), lm_head_weight=weight, lm_head_bias=head.bias,
                   kind=spec.kd_kind, temperature=spec.temperature, vocab_size=ctx.vocab_size)


def _ce(head: _Head, hidden: Tensor, batch: dict, mask: Tensor, ctx: StepContext) -> Tensor:
    rows, weight = head.rows(hidden, mask)
    targets = shift_labels(batch[C.LABELS])[mask]
    return ce_loss(rows, targets, lm_head_weight=weight, lm_head_bias=head.bias, vocab_size=ctx.vocab_size)


def _rel(head: _Head, hidden: Tensor, batch: dict, visual: Tensor, ctx: StepContext) -> Tensor:
    if C.TEACHER_RELATION not in batch:
        raise ValueError(f"batch: the rel term needs {C.TEACHER_RELATION} (RDist); was the data annotated for it?")
    per_row = visual.sum(1)
    if bool((per_row != per_row[0]).any()):
        raise ValueError(f"{C.VISUAL_MASK}: rows have different image-token counts {per_row.tolist()}; RDist needs one image per row")
    rows, weight = head.rows(hidden, visual)
    rows = rows.reshape(visual.shape[0], int(per_row[0]), rows.shape[-1])
    return rdist_loss(rows, batch[C.TEACHER_RELATION], lm_head_weight=weight, lm_head_bias=head.bias,
                      vocab_size=ctx.vocab_size)


def grounding_term(attentions, ids: Tensor, labels: Tensor, ctx: StepContext) -> Tensor:
    """Head 0 of every LM layer but the first, at the positions predicting a place word or a caption
    phrase's word, pulled onto the image tokens of the cell the word is about (actors.shapes.grounding)."""
    from actors.shapes.grounding import grounding_targets, patch_cells

    if not ctx.ground_words or not ctx.patches_per_side:
        raise ValueError("the ground term needs StepContext.ground_words and patches_per_side (the shapes world's tokenizer)")
    if not attentions or attentions[0] is None:
        raise ValueError("the ground term needs attention weights: load the model with attn_implementation='eager'")
    side = ctx.patches_per_side
    r, q, c = (torch.from_numpy(x).to(ids.device) for x in grounding_targets(
        ids.cpu().numpy(), labels.cpu().numpy(), ctx.ground_words, ctx.image_token_id, side))
    image = ids == ctx.image_token_id
    key_cell = torch.full_like(ids, -1)
    cells = torch.from_numpy(patch_cells(side)).to(ids.device)
    for b in torch.unique(r).tolist():
        key_cell[b, image[b]] = cells
    layers = list(attentions[1:]) or list(attentions)
    return grounding_loss(layers, r, q, key_cell[r] == c.unsqueeze(-1))


def _preference(model, head: _Head, batch: dict, spec: LossSpec, ctx: StepContext):
    """Chosen and rejected sequences in one forward of 2B rows (the image is shared)."""
    for name in (C.CHOSEN_INPUT_IDS, C.CHOSEN_LABELS, C.REJECTED_INPUT_IDS, C.REJECTED_LABELS,
                 C.TEACHER_CHOSEN_LOGP, C.TEACHER_REJECTED_LOGP):
        if name not in batch:
            raise ValueError(f"batch: the preference stage needs column {name!r}")
    ci, ri = batch[C.CHOSEN_INPUT_IDS], batch[C.REJECTED_INPUT_IDS]
    length = max(ci.shape[1], ri.shape[1])

    def pad(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)

    ids = torch.cat([pad(ci, ctx.pad_token_id), pad(ri, ctx.pad_token_id)])
    labels = torch.cat([pad(batch[C.CHOSEN_LABELS], C.IGNORE_INDEX), pad(batch[C.REJECTED_LABELS], C.IGNORE_INDEX)])
    attn = (ids != ctx.pad_token_id).long()  # the collate pads pair sequences with the pad id
    pixels = batch.get(C.PIXEL_VALUES)
    pixels = None if pixels is None else torch.cat([pixels, pixels])
    hidden = forward_hidden(model, ids, attn, pixels)
    if head.gather:
        logps = sequence_logps(head.module(hidden), labels, vocab_size=ctx.vocab_size)
    else:
        logps = sequence_logps(hidden, labels, lm_head_weight=head.module.weight, lm_head_bias=head.bias,
                               vocab_size=ctx.vocab_size)
    b = ci.shape[0]
    loss, stats = dpo_loss(logps[:b], logps[b:], batch[C.TEACHER_CHOSEN_LOGP].to(logps),
                           batch[C.TEACHER_REJECTED_LOGP].to(logps), beta=spec.dpo_beta, kind=spec.dpo_kind)
    logged = {"dpo/margin": stats["reward_margin"], "dpo/accuracy": stats["reward_accuracy"],
              "dpo/chosen_reward": stats["chosen_rewards"], "dpo/rejected_reward": stats["rejected_rewards"]}
    return {"dpo": loss}, logged, attn


def stage_step(model, batch: dict, stage: str, spec: LossSpec, ctx: StepContext, recorder=None) -> tuple[Tensor, dict]:
    """(total loss with graph, logged metrics as floats) for one batch of `stage`.

    recorder: a RouterRecorder attached to `model` when the student is sparse; its router logits of
    this forward give the aux term (weighted by spec.aux) and the per-layer expert load / entropy.
    """
    head = _Head(model, ctx)
    if recorder is not None:
        recorder.reset()
    weights = loss_weights(spec)
    extra: dict[str, Tensor] = {}
    if stage == "preference":
        terms, extra, token_mask = _preference(model, head, batch, spec, ctx)
    else:
        ids, labels, attn = batch[C.INPUT_IDS], batch[C.LABELS], batch[C.ATTENTION_MASK]
        # A term weighted 0 (an ablation arm: d2s without KL, LLaVA-KD's plain PT) is switched off: the
        # data plane did not annotate the teacher rows it would need (actors.annotate.annotation_plan).
        active = active_terms(stage, weights)
        terms = {}
        if "ground" in active:
            out = model.model(input_ids=ids, attention_mask=attn, pixel_values=batch.get(C.PIXEL_VALUES),
                              use_cache=False, output_attentions=True)
            hidden = out.last_hidden_state
            terms["ground"] = grounding_term(out.attentions, ids, labels, ctx)
        else:
            hidden = forward_hidden(model, ids, attn, batch.get(C.PIXEL_VALUES))
        token_mask = attn
        response = select_mask("response", labels=labels, attention_mask=attn)
        if "ce" in active:
            terms["ce"] = _ce(head, hidden, batch, response, ctx)
        if "kl" in active:
            kd_mask = select_mask(spec.kd_positions, labels=labels, input_ids=ids, attention_mask=attn,
                                  image_token_id=ctx.image_token_id)
            terms["kl"] = _kd(head, hidden, batch, kd_mask, spec, ctx, "kl")
        if "vis" in active or "rel" in active:
            visual = select_mask("visual", input_ids=ids, attention_mask=attn, image_token_id=ctx.image_token_id)
        if "res" in active:
            terms["res"] = _kd(head, hidden, batch, response, spec, ctx, "res")
        if "vis" in active:
            terms["vis"] = _kd(head, hidden, batch, visual, spec, ctx, "vis")
        if "rel" in active:
            terms["rel"] = _rel(head, hidden, batch, visual, ctx)
    router_log: dict[str, float] = {}
    sparse = recorder is not None and recorder.has_routers
    if sparse:
        rs = recorder.stats(token_mask=token_mask)
        terms["aux"] = rs.aux_loss
        for s in rs.layers:
            router_log[f"router/layer{s.layer}/entropy"] = s.entropy
            for e, f in enumerate(s.expert_fraction.tolist()):
                router_log[f"router/layer{s.layer}/expert{e}"] = f
    total, logged = stage_loss(stage, terms, weights, sparse=sparse)
    metrics = {f"loss/{k}": float(v) for k, v in logged.items()}
    metrics.update({k: float(v) for k, v in extra.items()})
    metrics.update(router_log)
    metrics["tokens"] = float(token_mask.sum())  # every non-pad token the forward processed
    return total, metrics
