"""Teacher/student tokenizer check and explicit masking of padded vocabularies."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from actors.shapes.tokenizer import build_tokenizer
from student.model import (
    TokenizerMismatchError,
    build_student,
    check_tokenizers,
    find_mismatches,
    get_preset,
    mask_padded_logits,
    vocab_mask,
)


@pytest.fixture(scope="module")
def other_tokenizer():
    """Same special tokens, different merges: ids of ordinary tokens move."""
    return build_tokenizer(corpus=["a large red circle at the top left", "what colour is the square?"] * 20)


def test_identical_tokenizers_pass(shapes_tokenizer):
    check_tokenizers(shapes_tokenizer, shapes_tokenizer)
    check_tokenizers(shapes_tokenizer, shapes_tokenizer, texts=["<image>What colour is the circle?", "red"])


def test_mismatch_error_names_the_tokens_and_ids(shapes_tokenizer, other_tokenizer):
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers(shapes_tokenizer, other_tokenizer, texts=["What colour is the circle?"])
    msg = str(err.value)
    t_id = shapes_tokenizer.convert_tokens_to_ids("Ġcircle")
    s_id = other_tokenizer.convert_tokens_to_ids("Ġcircle")
    assert t_id != s_id
    assert f"token 'Ġcircle': teacher id {t_id} vs student id {s_id}" in msg
    assert "text 0 ('What colour is the circle?') differs at token 0" in msg
    assert msg.startswith("teacher and student tokenizers disagree (")


def test_whole_vocab_check_lists_only_the_first_mismatches(shapes_tokenizer, other_tokenizer):
    mismatches = find_mismatches(shapes_tokenizer, other_tokenizer)
    assert len(mismatches) > 10
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers(shapes_tokenizer, other_tokenizer, shown=3)
    lines = str(err.value).splitlines()
    assert f"({len(mismatches)} mismatches; first 3)" in lines[0] and len(lines) == 4
    assert lines[1] == f"  - {mismatches[0]}"


def test_special_and_image_token_mismatches(shapes_tokenizer):
    backend = shapes_tokenizer.backend_tokenizer
    wrong_pad = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|end|>", eos_token="<|end|>", extra_special_tokens={"image_token": "<image>"}
    )
    with pytest.raises(TokenizerMismatchError, match=r"special token pad_token: teacher '<pad>' \(id 0\) vs student '<\|end\|>' \(id 1\)"):
        check_tokenizers(shapes_tokenizer, wrong_pad, texts=["red"])
    no_image = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>")
    with pytest.raises(TokenizerMismatchError, match="special token image_token: teacher '<image>' \\(id 2\\) vs student None"):
        check_tokenizers(shapes_tokenizer, no_image, texts=["red"])


def test_padded_logits_are_masked_not_sliced(shapes_tokenizer):
    tok = shapes_tokenizer
    model = build_student(get_preset("tiny"), tok, vocab_multiple=64)
    ids = torch.tensor([tok.encode("<|user|>What colour is the circle?")])
    logits = model(input_ids=ids).logits
    assert logits.shape[-1] == 448 > len(tok)
    masked = mask_padded_logits(logits, len(tok))
    assert masked.shape == logits.shape
    assert torch.isneginf(masked[..., len(tok):]).all()
    assert torch.equal(masked[..., : len(tok)], logits[..., : len(tok)])
    probs = masked.softmax(-1)
    assert torch.allclose(probs[..., : len(tok)].sum(-1), torch.ones(1))
    assert probs[..., len(tok):].sum() == 0
    assert vocab_mask(448, 413).sum() == 413
    assert mask_padded_logits(logits, 448) is logits
    with pytest.raises(ValueError, match="resize"):
        vocab_mask(400, 413)
    with pytest.raises(ValueError, match="exceeds"):
        mask_padded_logits(logits, 500)
