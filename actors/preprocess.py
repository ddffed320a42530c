"""Preprocessing: a source record -> one training row of `actors.columns` (or a RowReject).

Per record: read and decode the image, resize it with the model's image processor; render the
conversation with the tokenizer's chat template; tokenize with character offsets so every token is
known to be response (assistant content and its end-of-turn marker), prompt text or image; expand
the one image token into the processor's image_seq_length tokens; truncate over-long rows from the
end, never into the image tokens. Preference records become chosen/rejected pairs sharing the image.

`Preprocessor` is the Ray Data actor-pool stage: it catches errors per row, emits the good rows
and reports counts and rejects to the stage's `DataLedger`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from actors import columns as C
from actors.blocks import rows_to_table
from actors.rejects import RejectRateExceeded, RowReject, reject

__all__ = [
    "ProcessorSpec",
    "PreprocessConfig",
    "Encoded",
    "response_spans",
    "encode_conversation",
    "load_image",
    "preprocess_record",
    "Preprocessor",
    "ROLES",
    "image_seq_length_of",
    "output_columns",
]

ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ProcessorSpec:
    """How to build the model's processor inside a worker (processors do not travel well)."""

    tokenizer: str | None = None  # a tokenizer folder (the shapes world's `tokenizer/`)
    image_size: int = 48
    patch_size: int = 8
    pretrained: str | None = None  # or a saved processor (AutoProcessor), e.g. RUN/teacher

    def load(self):
        if self.pretrained:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(self.pretrained)
        if not self.tokenizer:
            raise ValueError("ProcessorSpec: give `tokenizer` (a folder) or `pretrained` (a processor folder)")
        from actors.shapes.tokenizer import load_tokenizer
        from student.model.builder import build_processor

        return build_processor(load_tokenizer(self.tokenizer), image_size=self.image_size, patch_size=self.patch_size)


@dataclass(frozen=True)
class PreprocessConfig:
    processor: ProcessorSpec
    max_length: int = 1024  # tokens after image-token expansion
    preference: bool = False  # rows become chosen/rejected pairs (the preference stage)


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T]
    response_mask: np.ndarray  # bool [T]
    instruction_mask: np.ndarray
    visual_mask: np.ndarray


def _check_messages(messages) -> list[dict]:
    if not messages:
        raise RowReject("empty_conversation", "the conversation has no turns")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowReject("bad_role", f"turn {i} has role {role!r}; expected one of {ROLES}")
        out.append({"role": role, "content": "" if content is None else str(content)})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise RowReject("no_response", "no assistant turn with content")
    return out


def response_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of each assistant turn: content + end-of-turn marker).

    A span starts where the template's generation prompt ends and stops where the rendering of the
    conversation up to and including that turn stops; that needs a prefix-stable template (every
    common chat template is).
    """
    def render(ms, gen=False):
        return tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], True)
        upto = text if i == len(messages) - 1 else render(messages[: i + 1])
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError("the chat template is not prefix-stable: cannot locate assistant turns")
        spans.append((len(head), len(upto)))
    return text, spans


def encode_conversation(tokenizer, messages, *, image_token_id: int, image_seq_length: int, num_images: int,
                        max_length: int) -> Encoded:
    """Token ids, labels and masks for one conversation, with the image token expanded.

    Raises RowReject for empty / role-less / response-less conversations, a placeholder count that
    differs from `num_images`, and rows that cannot be truncated to max_length without cutting
    image tokens or losing every response token.
    """
    messages = _check_messages(messages)
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != num_images:
        raise RowReject("image_token_count", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    text, spans = response_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    resp = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        resp |= (starts >= a) & (starts < b)
    where = np.flatnonzero(ids == image_token_id)
    if len(where) != num_images:
        raise RowReject("image_token_count", f"{len(where)} image token(s) after tokenization for {num_images} image(s)")
    if num_images:  # expand each image token into image_seq_length copies (back to front keeps indices valid)
        reps = np.ones(len(ids), dtype=np.int64)
        reps[where] = image_seq_length
        ids, resp = np.repeat(ids, reps), np.repeat(resp, reps)
    vis = ids == image_token_id
    if len(ids) > max_length:
        last_image = int(np.flatnonzero(vis).max()) + 1 if vis.any() else 0
        if last_image > max_length:
            raise RowReject("too_long", f"{len(ids)} tokens; the image tokens end at {last_image} > max_length {max_length}")
        ids, resp, vis = ids[:max_length], resp[:max_length], vis[:max_length]
        if not resp.any():
            raise RowReject("too_long", f"no response token left after truncation to max_length {max_length}")
    labels = np.where(resp, ids, C.IGNORE_INDEX)
    return Encoded(ids.astype(np.int32), labels.astype(np.int32), resp, ~resp & ~vis, vis)


def load_image(record: dict):
    """The record's image as an RGB PIL image, from embedded bytes or its file."""
    from PIL import Image, UnidentifiedImageError

    data, path = record.get("image"), record.get("image_path")
    if data is None:
        if not path:
            raise RowReject("no_image", "the row has neither image bytes nor an image path")
        if not os.path.isfile(path):
            raise RowReject("missing_image", f"{path} does not exist")
        with open(path, "rb") as f:
            data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        where = path or "embedded bytes"
        raise RowReject("undecodable_image", f"{where}: {type(e).__name__}: {e}") from None


def preprocess_record(record: dict, processor, *, image_seq_length: int, max_length: int, preference: bool) -> dict:
    """One SOURCE_SCHEMA record -> one row of `actors.columns` (raises RowReject)."""
    if record.get("error"):
        raise RowReject("malformed_record", str(record["error"]))
    tok = processor.tokenizer
    kw = dict(image_token_id=int(tok.image_token_id), image_seq_length=image_seq_length, num_images=1, max_length=max_length)
    messages = list(record.get("messages") or [])
    row = {C.ID: str(record["id"]), C.TASK: str(record.get("task") or ""), C.SUBTASK: str(record.get("subtask") or "")}
    if preference:
        chosen, rejected = record.get("chosen"), record.get("rejected")
        prompt = [m for m in messages if m.get("role") != "assistant"]
        if not prompt or not chosen or not rejected or not str(chosen).strip() or not str(rejected).strip():
            raise RowReject("bad_preference", "needs a prompt turn and non-empty chosen and rejected responses")
        c = encode_conversation(tok, prompt + [{"role": "assistant", "content": chosen}], **kw)
        r = encode_conversation(tok, prompt + [{"role": "assistant", "content": rejected}], **kw)
        row.update({C.CHOSEN_INPUT_IDS: c.input_ids, C.CHOSEN_LABELS: c.labels,
                    C.REJECTED_INPUT_IDS: r.input_ids, C.REJECTED_LABELS: r.labels})
    else:
        if record.get("chosen") and not any(m.get("role") == "assistant" for m in messages):
            messages = messages + [{"role": "assistant", "content": record["chosen"]}]  # a pair used for SFT
        e = encode_conversation(tok, messages, **kw)
        row.update({C.INPUT_IDS: e.input_ids, C.LABELS: e.labels, C.ATTENTION_MASK: np.ones(len(e.input_ids), np.int8),
                    C.RESPONSE_MASK: e.response_mask, C.INSTRUCTION_MASK: e.instruction_mask, C.VISUAL_MASK: e.visual_mask})
    image = load_image(record)
    pixels = processor.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
    row[C.PIXEL_VALUES] = np.ascontiguousarray(pixels, dtype=np.float32)
    return row


def image_seq_length_of(processor) -> int:
    """Image tokens per image, measured: the processor's own expansion of one placeholder."""
    from PIL import Image

    size = processor.image_processor.crop_size
    img = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(images=[img], text=[IMAGE_PLACEHOLDER], return_tensors="np")["input_ids"][0]
    return int((ids == processor.tokenizer.image_token_id).sum())


def output_columns(preference: bool) -> list[str]:
    seq = [C.CHOSEN_INPUT_IDS, C.CHOSEN_LABELS, C.REJECTED_INPUT_IDS, C.REJECTED_LABELS] if preference else \
        [C.INPUT_IDS, C.LABELS, C.ATTENTION_MASK, C.RESPONSE_MASK, C.INSTRUCTION_MASK, C.VISUAL_MASK]
    return [C.ID, C.TASK, C.SUBTASK, *seq, C.PIXEL_VALUES]


class Preprocessor:
    """Ray Data actor-pool UDF: SOURCE_SCHEMA pyarrow batches -> `actors.columns` Arrow blocks."""

    OP = "preprocess"

    def __init__(self, config: PreprocessConfig, ledger=None):
        self.config = config
        self.processor = config.processor.load()
        self.image_seq_length = image_seq_length_of(self.processor)
        self.columns = output_columns(config.preference)
        self.ledger = ledger

    def process(self, records: list[dict]) -> tuple[list[dict], list[dict]]:
        rows, rejects = [], []
        for rec in records:
            try:
                rows.append(preprocess_record(rec, self.processor, image_seq_length=self.image_seq_length,
                                              max_length=self.config.max_length, preference=self.config.preference))
            except Exception as e:  # per row: the row is rejected and counted, the pipeline goes on
                rejects.append(reject(rec.get("id"), rec.get("source"), e))
        return rows, rejects

    def __call__(self, batch):
        records = batch.to_pylist()
        rows, rejects = self.process(records)
        if self.ledger is not None:
            import ray

            stop = ray.get(self.ledger.record.remote(self.OP, len(records), len(rows), rejects))
            if stop:
                raise RejectRateExceeded(stop)
        return rows_to_table(rows, self.columns)
