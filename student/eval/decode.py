"""Batched greedy decoding of records with a Llava-style model (model.generate, KV cache, left padding).

Left padding keeps every prompt's last token at the same column, so one `generate` call decodes a
batch; HF derives position ids from the attention mask, so a padded batch decodes exactly like one
record at a time (tests/test_eval_decode.py checks that).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

__all__ = ["DecodeConfig", "prompt_turns", "build_prompt", "decode_image", "greedy_decode"]

IMAGE = "<image>"
SHORT_ANSWER_TASKS = ("vqa", "pope")


@dataclass(frozen=True)
class DecodeConfig:
    batch_size: int = 16
    max_new_tokens: int = 64  # captions: the world's longest is ~40 tokens, room left for an invented object
    short_max_new_tokens: int = 8  # VQA and POPE answers are 1-2 tokens

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.short_max_new_tokens < 1:
            raise ValueError(f"batch_size, max_new_tokens and short_max_new_tokens must be >= 1, got {self}")

    def budget(self, task: str) -> int:
        return min(self.short_max_new_tokens, self.max_new_tokens) if task in SHORT_ANSWER_TASKS else self.max_new_tokens


def prompt_turns(messages: list[dict], record_id: str = "?") -> list[dict]:
    """The conversation up to the last user turn: the reference answer is what the model must produce."""
    turns = list(messages)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise ValueError(f"record {record_id!r}: messages must end with a user turn (optionally + the answer)")
    return turns


def _list_form(turns: list[dict]) -> list[dict]:
    """String content with inline <image> -> HF's multimodal list form, which processor templates expect."""
    out = []
    for t in turns:
        parts = []
        for i, text in enumerate(t["content"].split(IMAGE)):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": t["role"], "content": parts})
    return out


def build_prompt(processor, turns: list[dict]) -> str:
    """The prompt text with the generation prompt appended, through the checkpoint's own chat template."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(_list_form(turns), tokenize=False, add_generation_prompt=True)
    tok = processor.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ValueError("the processor and its tokenizer have no chat template; cannot build prompts")
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def decode_image(data, record_id: str) -> list[Image.Image]:
    """A record's image(s) as RGB PIL images: encoded bytes (the record schema), a PIL image, or a list
    of either (one per <image> in the prompt, for multi-image benchmarks through lmms-eval)."""
    items = data if isinstance(data, (list, tuple)) else [data]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
            continue
        try:
            out.append(Image.open(io.BytesIO(item)).convert("RGB"))
        except Exception as e:  # PIL raises several types for bad bytes
            raise ValueError(f"record {record_id!r}: field 'image' is not a readable image ({e})") from e
    return out


def _batches(records: list[dict], cfg: DecodeConfig):
    """Index batches grouped by token budget (a record's own `max_new_tokens`, else its task's), longest
    prompts first (less padding, early OOM)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(int(r.get("max_new_tokens") or cfg.budget(r["task"])), []).append(i)
    for budget, idx in sorted(groups.items(), reverse=True):
        idx.sort(key=lambda i: -sum(len(m["content"]) for m in records[i]["messages"]))
        for s in range(0, len(idx), cfg.batch_size):
            yield budget, idx[s:s + cfg.batch_size]


@torch.no_grad()
def greedy_decode(model, processor, records: list[dict], cfg: DecodeConfig = DecodeConfig(),
                  progress: bool = True) -> list[str]:
    """The model's greedy answer to each record's prompt, in the records' order."""
    tok = processor.tokenizer
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else eos[0])
    device = next(model.parameters()).device
    float_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    prompts = [build_prompt(processor, prompt_turns(r["messages"], r["id"])) for r in records]
    answers: list[str | None] = [None] * len(records)
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    bar = tqdm(total=len(records), desc="eval", unit="rec", disable=not progress, dynamic_ncols=True)
    try:
        for budget, idx in _batches(records, cfg):
            images = [im for i in idx for im in decode_image(records[i]["image"], records[i]["id"])]
            batch = processor(images=images, text=[prompts[i] for i in idx], return_tensors="pt", padding=True)
            batch = {k: (v.to(device, float_dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
            out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=budget,
                                 eos_token_id=eos, pad_token_id=pad)
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
            bar.update(len(idx))
    finally:
        tok.padding_side = side
        model.train(was_training)
        bar.close()
    return answers  # type: ignore[return-value]
