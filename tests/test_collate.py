import numpy as np
import pytest
import torch

from actors import columns as C
from actors.collate import pad_collate


def _batch():
    ids = [np.array([5, 6, 7, 8], np.int32), np.array([5, 9], np.int32)]
    labels = [np.array([-100, -100, 7, 8], np.int32), np.array([-100, 9], np.int32)]
    return {
        C.ID: np.array(["a", "b"], dtype=object),
        C.INPUT_IDS: np.array(ids, dtype=object),
        C.LABELS: np.array(labels, dtype=object),
        C.ATTENTION_MASK: np.array([np.ones(4, np.int8), np.ones(2, np.int8)], dtype=object),
        C.RESPONSE_MASK: np.array([np.array([0, 0, 1, 1], bool), np.array([0, 1], bool)], dtype=object),
        C.PIXEL_VALUES: np.zeros((2, 3, 4, 4), np.float32),
        C.TEACHER_POSITIONS: np.array([np.array([1, 2], np.int32), np.array([0], np.int32)], dtype=object),
        C.TEACHER_TOPK_IDS: np.array([np.ones((2, 3), np.int32), np.full((1, 3), 2, np.int32)], dtype=object),
        C.TEACHER_TOPK_LOGPROBS: np.array([np.zeros((2, 3), np.float16), np.zeros((1, 3), np.float16)], dtype=object),
        C.TEACHER_TAIL_LOGMASS: np.array([np.zeros(2, np.float32), np.zeros(1, np.float32)], dtype=object),
    }


def test_pads_per_batch_and_aligns_teacher_rows():
    out = pad_collate(_batch(), pad_id=0)
    assert out[C.INPUT_IDS].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert out[C.LABELS].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert out[C.ATTENTION_MASK].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out[C.RESPONSE_MASK].dtype == torch.bool
    assert out["teacher_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]
    # row-major x[mask] order: row 0's two positions, then row 1's
    assert out[C.TEACHER_TOPK_IDS][:, 0].tolist() == [1, 1, 2]
    assert out[C.TEACHER_TOPK_LOGPROBS].dtype == torch.float32
    assert out[C.ID] == ["a", "b"]


def test_rejects_positions_out_of_range():
    b = _batch()
    b[C.TEACHER_POSITIONS] = np.array([np.array([1, 9], np.int32), np.array([0], np.int32)], dtype=object)
    with pytest.raises(ValueError, match="row 0"):
        pad_collate(b, pad_id=0)
