"""A tiny real teacher and matching requests, for the service's tests and benchmarks.

The teacher is the `tiny` preset's (random weights: the service's math does not care what the
teacher knows), saved as an ordinary HF checkpoint with its processor, i.e. what RUN/teacher/ holds.
`reference_scores` is the in-process answer the service must reproduce: one full forward per
sequence, fp32 log-softmax over the tokenizer's vocab. `NoopBackend` ("noop" in the registry)
answers correctly shaped responses without any model forward: the service's own cost, measured by
bench/serve_cost.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from teacher_service.backends.base import TeacherBackend
from teacher_service.protocol import ScoreRequest, ScoreResponse, TeacherInfo, make_request

__all__ = ["save_tiny_teacher", "tiny_backend", "sample_requests", "reference_scores", "NoopBackend"]

QUESTIONS = ("What colour is the circle?", "Describe the image.", "How many squares are there?", "Is there a red triangle?")
ANSWERS = ("red", "a large blue square at the top left", "two", "no, there is a green triangle at the bottom")


def save_tiny_teacher(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Build the preset's teacher with the shapes tokenizer and save model + processor to `out`."""
    from actors.shapes.tokenizer import build_tokenizer
    from student.model import build_processor, build_teacher, get_preset

    out = Path(out)
    tok = build_tokenizer()
    p = get_preset(preset)
    model = build_teacher(p, tok, seed=seed)
    model.save_pretrained(out)
    build_processor(tok, image_size=p.vision.image_size, patch_size=p.vision.patch_size).save_pretrained(out)
    return out


def tiny_backend(out: str | Path, *, preset: str = "tiny", threads: int = 1, seed: int = 0):
    """(checkpoint dir, in-process hf backend on CPU fp32) of `save_tiny_teacher(out)`: the benches'
    common set-up, so the Serve app they deploy and the in-process reference load the same teacher."""
    from teacher_service.backends import create_backend

    model = save_tiny_teacher(out, preset=preset, seed=seed)
    return model, create_backend("hf", str(model), device="cpu", dtype="float32", torch_threads=threads)


def _png(seed: int, size: int) -> bytes:
    from PIL import Image

    arr = np.random.RandomState(seed).randint(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sample_requests(
    processor,
    n: int,
    *,
    top_k: int = 64,
    logprobs_dtype: str = "float16",
    encoded_images: bool = True,
    relation: bool = False,
    seed: int = 0,
    repeat_answer: int = 1,
) -> list[ScoreRequest]:
    """n single-image chat requests of varied length: top-k at every text position after the image,
    target log-probs of the actual next tokens, and the answer's sequence log-prob (a DPO reference).

    encoded_images: ship PNG bytes (the service decodes them) or preprocessed pixel_values.
    repeat_answer: make the answer that many times longer (bigger requests for benchmarks).
    """
    from PIL import Image

    tok = processor.tokenizer
    size = processor.image_processor.crop_size["height"]
    out = []
    for i in range(n):
        q, a = QUESTIONS[(i + seed) % len(QUESTIONS)], " ".join([ANSWERS[(i + seed) % len(ANSWERS)]] * repeat_answer)
        prompt = tok.apply_chat_template([{"role": "user", "content": "<image>" + q}], tokenize=False, add_generation_prompt=True)
        png = _png(seed * 1000 + i, size)
        enc = processor(images=[Image.open(io.BytesIO(png)).convert("RGB")], text=[prompt + a], return_tensors="np")
        ids = enc["input_ids"][0].astype(np.int32)
        prompt_len = len(processor(images=[Image.open(io.BytesIO(png)).convert("RGB")], text=[prompt], return_tensors="np")["input_ids"][0])
        last_image = int(np.flatnonzero(ids == tok.image_token_id).max())
        positions = np.arange(last_image, len(ids) - 1, dtype=np.int32)  # rows predicting tokens after the image
        seq_mask = np.zeros(len(ids), bool)
        seq_mask[prompt_len:] = True  # the answer tokens
        out.append(
            make_request(
                ids,
                positions=positions,
                target_ids=ids[positions + 1],
                sequence_mask=seq_mask,
                images=[png] if encoded_images else (),
                pixel_values=None if encoded_images else enc["pixel_values"],
                top_k=top_k,
                logprobs_dtype=logprobs_dtype,
                relation=relation,
                request_id=f"req-{seed}-{i}",
            )
        )
    return out


def reference_scores(model, processor, request: ScoreRequest) -> dict:
    """What the service must answer, from one unbatched fp32 forward with full logits.

    {"logprobs": [N, V] at request.positions, "targets": [N], "sequence": float, "visual_logits":
    [n_images, Np, V] (the image-token rows, for the relation matrix)}.
    """
    import torch
    from PIL import Image

    vocab = len(processor.tokenizer)
    if request.pixel_values is not None:
        pv = torch.tensor(request.pixel_values, dtype=torch.float32)
    else:
        pils = [Image.open(io.BytesIO(b)).convert("RGB") for b in request.images]
        pv = torch.tensor(processor.image_processor(images=pils, return_tensors="np")["pixel_values"]) if pils else None
    ids = torch.tensor(request.input_ids, dtype=torch.long)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=pv).logits[0, :, :vocab].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = torch.tensor(request.positions, dtype=torch.long)
    out = {"logprobs": logp[pos].numpy()}
    if request.target_ids is not None:
        out["targets"] = logp[pos, torch.tensor(request.target_ids, dtype=torch.long)].numpy()
    if request.sequence_mask is not None:
        t = torch.tensor(np.flatnonzero(request.sequence_mask))
        out["sequence"] = float(logp[t - 1, ids[0, t]].double().sum())
    image_token_id = model.config.image_token_id
    vis = ids[0] == image_token_id
    out["visual_logits"] = logits[vis].reshape(-1, int(model.config.image_seq_length), vocab).numpy()
    return out


class NoopBackend(TeacherBackend):
    """A teacher that computes nothing: validation, image decoding and batching run as for `hf`, but
    every answer is a constant of the right shape and dtype (top-k ids 0..k-1 at log(1/V), tail mass,
    target log-probs, sequence log-prob, relation zeros). Reads only config.json and the processor of
    the checkpoint `model`, never its weights, so the service's per-call cost shows alone."""

    name = "noop"

    def __init__(self, model: str | Path, *, device: str = "cpu", dtype: str = "float32", model_id: str | None = None,
                 torch_threads: int | None = None):
        from transformers import AutoConfig, AutoProcessor

        from teacher_service.identity import model_id as checkpoint_model_id
        from teacher_service.identity import tokenizer_hash

        cfg = AutoConfig.from_pretrained(str(model), local_files_only=True)
        self.processor = AutoProcessor.from_pretrained(str(model), local_files_only=True)
        tok = self.processor.tokenizer
        size = int(cfg.vision_config.image_size)
        self.info = TeacherInfo(
            model_id=model_id or checkpoint_model_id(model), tokenizer_hash=tokenizer_hash(tok), backend=self.name,
            vocab_size=len(tok), image_token_id=int(cfg.image_token_id), image_seq_length=int(cfg.image_seq_length),
            image_shape=(3, size, size), pad_token_id=int(tok.pad_token_id or 0), dtype=dtype, device=device)

    def prepare(self, request: ScoreRequest, limits) -> ScoreRequest:
        from teacher_service.backends.base import with_pixel_values

        return with_pixel_values(request, limits, self.processor.image_processor)

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        info, out = self.info, []
        for r in requests:
            n = 0 if r.positions is None else len(r.positions)
            f: dict = {}
            if r.top_k and n:
                k = int(r.top_k)
                f["topk_ids"] = np.tile(np.arange(k, dtype=np.int32), (n, 1))
                f["topk_logprobs"] = np.full((n, k), -np.log(info.vocab_size), dtype=r.logprobs_dtype)
                f["tail_logmass"] = np.full(n, np.log1p(-k / info.vocab_size) if k < info.vocab_size else -np.inf, np.float32)
            if r.target_ids is not None:
                f["target_logprobs"] = np.full(n, -np.log(info.vocab_size), np.float32)
            if r.sequence_mask is not None:
                f["sequence_logprob"] = float(-np.log(info.vocab_size) * r.sequence_mask.sum())
            if r.relation:
                np_ = info.image_seq_length
                f["relation"] = np.zeros((r.num_images, np_, np_), dtype=r.relation_dtype)
            out.append(ScoreResponse(model_id=info.model_id, tokenizer_hash=info.tokenizer_hash, request_id=r.request_id, **f))
        return out
