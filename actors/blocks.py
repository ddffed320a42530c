"""Contract rows as Arrow tables with fixed column types, so every block of a stage has one schema.

Ray Data infers a block's schema from what a UDF returns; a batch whose rows were all rejected
would come back typeless (null columns) and clash with its neighbours. Building every block with
these types (Ray's variable-shaped tensor type for per-row arrays) keeps the schema stable, and the
trainer still receives per-row NumPy arrays (`iter_batches(batch_format="numpy")`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowVariableShapedTensorArray, ArrowVariableShapedTensorType

from actors import columns as C

__all__ = ["COLUMN_TYPES", "rows_to_table", "table_rows"]


def _tensor(dtype, ndim: int):
    return (np.dtype(dtype), ndim)


# column -> str | float32 scalar | (numpy dtype, ndim) per-row tensor
COLUMN_TYPES: dict[str, object] = {
    C.ID: "str", C.TASK: "str", C.SUBTASK: "str",
    C.INPUT_IDS: _tensor(np.int32, 1), C.LABELS: _tensor(np.int32, 1), C.ATTENTION_MASK: _tensor(np.int8, 1),
    C.RESPONSE_MASK: _tensor(bool, 1), C.INSTRUCTION_MASK: _tensor(bool, 1), C.VISUAL_MASK: _tensor(bool, 1),
    C.PIXEL_VALUES: _tensor(np.float32, 3),
    C.CHOSEN_INPUT_IDS: _tensor(np.int32, 1), C.CHOSEN_LABELS: _tensor(np.int32, 1),
    C.REJECTED_INPUT_IDS: _tensor(np.int32, 1), C.REJECTED_LABELS: _tensor(np.int32, 1),
    C.TEACHER_POSITIONS: _tensor(np.int32, 1), C.TEACHER_TOPK_IDS: _tensor(np.int32, 2),
    C.TEACHER_TOPK_LOGPROBS: _tensor(np.float16, 2), C.TEACHER_TAIL_LOGMASS: _tensor(np.float32, 1),
    C.TEACHER_RELATION: _tensor(np.float32, 2),
    C.TEACHER_CHOSEN_LOGP: "float32", C.TEACHER_REJECTED_LOGP: "float32",
    C.TEACHER_MODEL_ID: "str", C.TEACHER_TOKENIZER_HASH: "str",
}


def _column(name: str, values: list) -> pa.Array:
    kind = COLUMN_TYPES.get(name)
    if kind is None:
        raise KeyError(f"column {name!r} is not part of the row contract (actors.columns)")
    if kind == "str":
        return pa.array([str(v) for v in values], pa.string())
    if kind == "float32":
        return pa.array(np.asarray(values, dtype=np.float32), pa.float32())
    dtype, ndim = kind
    if not values:
        t = ArrowVariableShapedTensorType(pa.from_numpy_dtype(dtype), ndim)
        return pa.ExtensionArray.from_storage(t, pa.array([], t.storage_type))
    arrays = []
    for v in values:
        a = np.ascontiguousarray(v, dtype=dtype)
        if a.ndim != ndim:
            raise ValueError(f"column {name!r}: expected {ndim}-D rows, got shape {a.shape}")
        arrays.append(a)
    return ArrowVariableShapedTensorArray.from_numpy(arrays)


def rows_to_table(rows: list[dict], names: list[str]) -> pa.Table:
    """One Arrow block of contract rows (the same schema whether rows is empty or not)."""
    return pa.table({n: _column(n, [r[n] for r in rows]) for n in names})


def table_rows(batch) -> list[dict]:
    """A numpy batch (column -> array) as a list of row dicts."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{k: batch[k][i] for k in names} for i in range(n)]
