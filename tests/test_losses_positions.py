"""Position masks on a hand-written batch (left padding, expanded image tokens)."""
import pytest
import torch

from student.losses import MASK_KINDS, select_mask, shift_labels

IMG = 99
# row 0: [pad, img, img, sys, q, r1, r2]   row 1: [img, img, q, q, r1, eos, pad]
INPUT_IDS = torch.tensor([[0, IMG, IMG, 5, 6, 7, 8], [IMG, IMG, 6, 6, 7, 2, 0]])
ATTN = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
LABELS = torch.tensor([[-100, -100, -100, -100, -100, 7, 8], [-100, -100, -100, -100, 7, 2, -100]])


def _pos(mask):
    return [row.nonzero().squeeze(1).tolist() for row in mask]


def test_shift_labels():
    assert shift_labels(LABELS).tolist() == [[-100, -100, -100, -100, 7, 8, -100], [-100, -100, -100, 7, 2, -100, -100]]


def test_response_positions_are_the_ce_positions():
    # logits at t predict token t+1: the positions right before each response token
    assert _pos(select_mask("response", LABELS, INPUT_IDS, ATTN, IMG)) == [[4, 5], [3, 4]]


def test_response_plus_instruction():
    # every real position whose next token is real text (not an image token, not padding)
    assert _pos(select_mask("response+instruction", LABELS, INPUT_IDS, ATTN, IMG)) == [[2, 3, 4, 5], [1, 2, 3, 4]]


def test_visual_and_mdist():
    assert _pos(select_mask("visual", LABELS, INPUT_IDS, ATTN, IMG)) == [[1, 2], [0, 1]]
    assert _pos(select_mask("mdist", LABELS, INPUT_IDS, ATTN, IMG)) == [[1, 2, 4, 5], [0, 1, 3, 4]]


def test_all_kinds_exclude_padding_and_return_bool():
    for kind in MASK_KINDS:
        m = select_mask(kind, LABELS, INPUT_IDS, ATTN, IMG)
        assert m.dtype == torch.bool and m.shape == LABELS.shape
        assert not (m & (ATTN == 0)).any()


def test_validation():
    with pytest.raises(ValueError, match="kind"):
        select_mask("instruction", LABELS, INPUT_IDS, ATTN, IMG)
    with pytest.raises(ValueError, match="image_token_id"):
        select_mask("visual", LABELS, INPUT_IDS, ATTN)
    with pytest.raises(ValueError, match="labels"):
        select_mask("response", None, INPUT_IDS, ATTN, IMG)
    with pytest.raises(ValueError, match="attention_mask"):
        select_mask("response", LABELS, INPUT_IDS, ATTN[:, :5], IMG)
