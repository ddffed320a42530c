"""Preprocessing obeys the row contract (actors.columns): no Ray needed, the pure per-record path."""
import glob
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from actors import columns as C
from actors.annotate import annotation_plan, row_positions
from actors.collate import pad_collate
from actors.preprocess import (
    ProcessorSpec,
    encode_conversation,
    image_seq_length_of,
    preprocess_record,
)
from actors.recipe import load_recipe
from actors.rejects import RowReject
from student.losses.positions import select_mask


@pytest.fixture(scope="module")
def processor(shapes_world):
    return ProcessorSpec(tokenizer=str(shapes_world / "tokenizer")).load()


@pytest.fixture(scope="module")
def records(shapes_world):
    return pq.read_table(sorted(glob.glob(f"{shapes_world}/train/*.parquet"))).to_pylist()


def _png(color=(200, 30, 30), size=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _pre(rec, processor, max_length=1024, preference=False):
    return preprocess_record(rec, processor, image_seq_length=image_seq_length_of(processor), max_length=max_length,
                             preference=preference)


def test_rows_match_the_processor_and_the_chat_template(records, processor):
    tok = processor.tokenizer
    assert image_seq_length_of(processor) == 36
    sample = [r for r in records if r["task"] != "preference"]
    assert any(len(r["messages"]) > 2 for r in sample[:12])  # multi-turn rows are covered
    for rec in sample[:12]:
        row = _pre(rec, processor)
        text = tok.apply_chat_template(rec["messages"], tokenize=False)
        ref = processor(images=[Image.open(io.BytesIO(rec["image"])).convert("RGB")], text=[text], return_tensors="np")
        np.testing.assert_array_equal(row[C.INPUT_IDS], ref["input_ids"][0])  # the processor's own expansion
        np.testing.assert_allclose(row[C.PIXEL_VALUES], ref["pixel_values"][0])
        ids, labels = row[C.INPUT_IDS], row[C.LABELS]
        assert ids.dtype == np.int32 and labels.dtype == np.int32 and row[C.PIXEL_VALUES].dtype == np.float32
        assert row[C.ATTENTION_MASK].dtype == np.int8 and row[C.ATTENTION_MASK].all()
        resp, inst, vis = row[C.RESPONSE_MASK], row[C.INSTRUCTION_MASK], row[C.VISUAL_MASK]
        assert (resp.astype(int) + inst + vis == 1).all()  # every token is exactly one kind
        np.testing.assert_array_equal(labels, np.where(resp, ids, C.IGNORE_INDEX))
        # the response is each assistant turn's text and its end-of-turn marker, and it ends the row
        answers = [m["content"] + "<|end|>" for m in rec["messages"] if m["role"] == "assistant"]
        assert tok.decode(ids[resp]) == "".join(answers)
        assert resp[-1] and np.flatnonzero(resp).min() > np.flatnonzero(vis).max()
        # one contiguous run of 36 image tokens, in the user turn
        where = np.flatnonzero(vis)
        assert len(where) == 36 and (np.diff(where) == 1).all() and (ids[vis] == tok.image_token_id).all()


def test_multi_turn_llava_rows_label_every_assistant_turn(processor):
    rec = {"id": "m", "image": _png(), "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image>\nWhat colour is the square?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many squares are there?"}, {"role": "assistant", "content": "one"}]}
    row = _pre(rec, processor)
    tok = processor.tokenizer
    assert tok.decode(row[C.INPUT_IDS][row[C.RESPONSE_MASK]]) == "red<|end|>one<|end|>"
    inst_text = tok.decode(row[C.INPUT_IDS][row[C.INSTRUCTION_MASK]])
    assert "Answer briefly." in inst_text and "How many squares" in inst_text and "red" not in inst_text


def test_truncation_never_cuts_image_tokens(processor):
    tok = processor.tokenizer
    kw = dict(image_token_id=tok.image_token_id, image_seq_length=36, num_images=1)
    long_answer = " ".join(["a large blue square at the top left"] * 20)
    msgs = [{"role": "user", "content": "<image>Describe the image."}, {"role": "assistant", "content": long_answer}]
    full = encode_conversation(tok, msgs, max_length=4096, **kw)
    cut = encode_conversation(tok, msgs, max_length=60, **kw)
    assert len(full.input_ids) > 60 and len(cut.input_ids) == 60
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:60])
    assert cut.visual_mask.sum() == 36 and cut.response_mask.any()
    image_end = int(np.flatnonzero(full.visual_mask).max()) + 1
    with pytest.raises(RowReject, match="image tokens end at") as e:
        encode_conversation(tok, msgs, max_length=image_end - 1, **kw)
    assert e.value.reason == "too_long"
    first_response = int(np.flatnonzero(full.response_mask).min())
    with pytest.raises(RowReject, match="no response token left"):
        encode_conversation(tok, msgs, max_length=first_response, **kw)


def test_preference_rows_share_the_prompt_and_the_image(records, processor):
    rec = next(r for r in records if r["task"] == "preference")
    row = _pre(rec, processor, preference=True)
    assert set(row) == {C.ID, C.TASK, C.SUBTASK, C.CHOSEN_INPUT_IDS, C.CHOSEN_LABELS, C.REJECTED_INPUT_IDS,
                        C.REJECTED_LABELS, C.PIXEL_VALUES}
    tok = processor.tokenizer
    for ids, labels, text in ((row[C.CHOSEN_INPUT_IDS], row[C.CHOSEN_LABELS], rec["chosen"]),
                              (row[C.REJECTED_INPUT_IDS], row[C.REJECTED_LABELS], rec["rejected"])):
        assert tok.decode(ids[labels != C.IGNORE_INDEX]) == text + "<|end|>"
        assert (ids == tok.image_token_id).sum() == 36
    start = int(np.flatnonzero(row[C.CHOSEN_LABELS] != C.IGNORE_INDEX).min())
    np.testing.assert_array_equal(row[C.CHOSEN_INPUT_IDS][:start], row[C.REJECTED_INPUT_IDS][:start])
    with pytest.raises(RowReject) as e:
        _pre({**rec, "rejected": ""}, processor, preference=True)
    assert e.value.reason == "bad_preference"


@pytest.mark.parametrize("change, reason", [
    (dict(messages=[]), "empty_conversation"),
    (dict(messages=[{"role": "narrator", "content": "<image>hi"}, {"role": "assistant", "content": "x"}]), "bad_role"),
    (dict(messages=[{"role": "user", "content": "<image>hi"}]), "no_response"),
    (dict(messages=[{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "  "}]), "no_response"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]), "image_token_count"),
    (dict(messages=[{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "x"}]), "image_token_count"),
    (dict(image=None, image_path="/nonexistent/x.png"), "missing_image"),
    (dict(image=b"\x89PNG\r\n\x1a\n not really"), "undecodable_image"),
    (dict(image=None, image_path=None), "no_image"),
])
def test_bad_records_are_rejected_with_their_reason(processor, change, reason):
    rec = {"id": "r", "image": _png(), "image_path": None,
           "messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}], **change}
    with pytest.raises(RowReject) as e:
        _pre(rec, processor)
    assert e.value.reason == reason


def test_annotation_plans_follow_the_stage_losses():
    recipe = load_recipe("datasets/shapes.yaml")
    plans = {s: annotation_plan(s, spec.loss) for s, spec in recipe.stages.items()}
    assert plans["teacher"] is None and plans["init"] is None and plans["sft"] is None
    assert plans["d2d"].positions == ("response",) and not plans["d2d"].relation
    assert plans["d2s"].positions == ("response",)
    assert plans["dpt"].positions == ("mdist",) and plans["dpt"].relation and plans["dft"].relation
    assert plans["preference"].preference and not plans["preference"].positions


@pytest.mark.parametrize("kinds", [("response",), ("mdist",), ("response+instruction",)])
def test_teacher_positions_line_up_with_the_losses_masks(records, processor, kinds):
    """Per-row positions, concatenated by the collate, select exactly select_mask(kind) on the batch."""
    image_token_id = processor.tokenizer.image_token_id
    rows = [_pre(r, processor) for r in records if r["task"] != "preference"][:6]
    for r in rows:
        r[C.TEACHER_POSITIONS] = row_positions(r, kinds, image_token_id)
    batch = pad_collate({k: [r[k] for r in rows] for k in rows[0]}, pad_id=processor.tokenizer.pad_token_id)
    want = torch.zeros_like(batch[C.INPUT_IDS], dtype=torch.bool)
    for kind in kinds:
        want |= select_mask(kind, labels=batch[C.LABELS], input_ids=batch[C.INPUT_IDS],
                            attention_mask=batch[C.ATTENTION_MASK], image_token_id=image_token_id)
    assert torch.equal(batch["teacher_mask"], want) and want.any()
