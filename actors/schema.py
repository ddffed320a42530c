"""The record schema every source is normalised to (documented in datasets/README.md).

One row = one image + one conversation. Declaring the Arrow schema up front means a wrong file is
refused when it is opened, not after a full pass (users of peers' caches complain of exactly that).
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
OBJECT = pa.struct([
    ("shape", pa.string()), ("colour", pa.string()), ("size", pa.string()), ("position", pa.string()),
])

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("image", pa.binary()),  # encoded PNG/JPEG bytes
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("subtask", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("noisy", pa.bool_()),
        pa.field("split", pa.string()),
        pa.field("objects", pa.list_(OBJECT)),
        pa.field("cell_present", pa.list_(pa.int8())),
        pa.field("cell_shape", pa.list_(pa.int8())),
        pa.field("cell_colour", pa.list_(pa.int8())),
        pa.field("cell_size", pa.list_(pa.int8())),
    ],
    metadata={"mod_distill.schema_version": SCHEMA_VERSION},
)

REQUIRED = ("id", "messages", "task")


def check_schema(schema: pa.Schema, where: str = "table") -> None:
    """Raise if required columns are missing or have the wrong type; extra columns are allowed."""
    problems = []
    for name in REQUIRED:
        if name not in schema.names:
            problems.append(f"missing column {name!r}")
    for field in schema:
        if field.name in RECORD_SCHEMA.names:
            want = RECORD_SCHEMA.field(field.name).type
            if not field.type.equals(want):
                problems.append(f"column {field.name!r} is {field.type}, expected {want}")
    if problems:
        raise ValueError(f"{where} does not follow the record schema (datasets/README.md): " + "; ".join(problems))
