"""Sources: read each recipe source into Ray Data records of one fixed shape (`SOURCE_SCHEMA`).

Three formats (`actors.recipe.SOURCE_FORMATS`):

* ``shapes``: the shapes world's Parquet (`actors.schema.RECORD_SCHEMA`), streamed by Ray Data;
* ``llava_json``: LLaVA conversation JSON/JSONL ``{"id", "image", "conversations": [{"from":
  "human"|"gpt", "value"}]}`` with an image root folder;
* ``preference``: RLAIF-V style ``{image, question, chosen, rejected}`` from JSON, JSONL or Parquet,
  or record-schema Parquet whose rows carry ``chosen`` / ``rejected`` (the shapes world).

Normalisation never judges a record: a missing file, a broken conversation or an odd role is kept
as it is and rejected, with its id and reason, by preprocessing (`actors.preprocess`), so every
bad row lands in the rejects file instead of failing the read or vanishing. A record that cannot be
read at all (a JSONL line that is not JSON, an array element that is not an object) becomes a row
whose `error` says where and why; preprocessing rejects it as `malformed_record`. Only a whole file
that cannot be read (not JSON, not Parquet) stops the run, with the file named.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.recipe import SourceSpec, resolve_path
from actors.schema import MESSAGE, check_schema

__all__ = [
    "SOURCE_SCHEMA",
    "LLAVA_ROLES",
    "llava_record",
    "preference_record",
    "records_table",
    "source_files",
    "load_source",
]

# What every source becomes. `image` holds encoded bytes when the source embeds them, `image_path`
# a file to read otherwise (preprocessing reads it, so a missing file is a per-row reject).
SOURCE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("task", pa.string()),
    pa.field("subtask", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("image_path", pa.string()),
    pa.field("messages", pa.list_(MESSAGE)),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("error", pa.string()),  # the record could not be read (file:line and why); rejected
])

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


class MalformedRecord:
    """A source record that could not be parsed; becomes a row that preprocessing rejects."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason


def _unreadable(raw, source: str, index: int) -> dict:
    """The row of a record that is not a JSON object: only its id and what went wrong."""
    if isinstance(raw, MalformedRecord):
        error = f"{raw.where}: {raw.reason}"
    else:
        error = f"record {index} of source {source!r} is a JSON {type(raw).__name__}, not an object"
    return {"id": f"{source}-{index}", "source": source, "task": "", "subtask": "", "image": None, "image_path": None,
            "messages": [], "chosen": None, "rejected": None, "error": error}


def _image_path(image, image_root: str | None) -> str | None:
    if image is None or image == "":
        return None
    path = str(image)
    return path if os.path.isabs(path) or not image_root else os.path.join(image_root, path)


def llava_record(raw: dict, *, source: str, index: int, image_root: str | None) -> dict:
    """One LLaVA conversation -> a SOURCE_SCHEMA row. Roles are mapped (human->user, gpt->assistant);
    an unknown role is kept verbatim for preprocessing to reject."""
    if not isinstance(raw, dict):
        return _unreadable(raw, source, index)
    turns = raw.get("conversations")
    messages = []
    if isinstance(turns, list):
        for t in turns:
            if not isinstance(t, dict):
                messages.append({"role": "?", "content": str(t)})
                continue
            role = str(t.get("from", t.get("role", "?")))
            content = t.get("value", t.get("content"))
            messages.append({"role": LLAVA_ROLES.get(role, role), "content": "" if content is None else str(content)})
    image = raw.get("image")
    if isinstance(image, list):  # multi-image rows: keep the first path; preprocessing counts placeholders
        image = image[0] if len(image) == 1 else json.dumps(image)
    return {
        "id": str(raw.get("id", f"{source}-{index}")),
        "source": source,
        "task": str(raw.get("task", "llava")),
        "subtask": str(raw.get("subtask", "") or ""),
        "image": None,
        "image_path": _image_path(image, image_root),
        "messages": messages,
        "chosen": None,
        "rejected": None,
    }


def preference_record(raw: dict, *, source: str, index: int, image_root: str | None) -> dict:
    """One RLAIF-V style row -> a SOURCE_SCHEMA row: the question becomes the user turn (with the
    image placeholder prepended when absent: RLAIF-V questions do not carry one)."""
    if not isinstance(raw, dict):
        return _unreadable(raw, source, index)
    image = raw.get("image")
    data, path = None, None
    if isinstance(image, dict):  # the HF image feature: {"bytes", "path"}
        data, path = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        path = image
    question = raw.get("question")
    question = "" if question is None else str(question)
    if question and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    rid = raw.get("id", raw.get("idx", f"{source}-{index}"))
    return {
        "id": str(rid),
        "source": source,
        "task": "preference",
        "subtask": str(raw.get("ds_name", raw.get("subtask", "")) or ""),
        "image": data,
        "image_path": None if data else _image_path(path, image_root),
        "messages": [{"role": "user", "content": question}] if question else [],
        "chosen": None if raw.get("chosen") is None else str(raw["chosen"]),
        "rejected": None if raw.get("rejected") is None else str(raw["rejected"]),
    }


def records_table(rows: Iterable[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SOURCE_SCHEMA)


def _load_json(path: str) -> list:
    """A JSON array, or JSON Lines (one object a line; a malformed line becomes a MalformedRecord
    naming the file and line, rejected and counted downstream). A JSON array file that does not
    parse is an error naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith(".jsonl") or not text.lstrip().startswith("["):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    out.append(MalformedRecord(f"{path}:{n}", f"not valid JSON ({e.msg} at column {e.colno})"))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def source_files(spec: SourceSpec, variables: dict[str, str] | None = None) -> list[str]:
    """The files a source reads: `path` (a file, a folder, or a glob), under `split/` when given."""
    where = f"source {spec.name!r}"
    root = resolve_path(spec.path, variables, where=f"{where}.path")
    if spec.split:
        root = os.path.join(root, spec.split)
    if os.path.isdir(root):
        files = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
                       or glob.glob(os.path.join(root, "*.json*")))
    elif any(c in root for c in "*?["):
        files = sorted(glob.glob(root))
    else:
        files = [root] if os.path.exists(root) else []
    if not files:
        raise FileNotFoundError(f"{where}: no data at {root}")
    return files


def _filter_tasks(table: pa.Table, tasks: tuple[str, ...]) -> pa.Table:
    """Rows of the given tasks; unreadable rows (no task known) are kept, to be rejected and counted."""
    if not tasks:
        return table
    keep = pc.fill_null(pc.is_in(table["task"], value_set=pa.array(list(tasks))), False)
    if "error" in table.column_names:
        keep = pc.or_(keep, pc.is_valid(table["error"]))
    return table.filter(keep)


def _from_record_parquet(batch: pa.Table, source: str, tasks: tuple[str, ...]) -> pa.Table:
    """Record-schema Parquet (shapes world) -> SOURCE_SCHEMA."""
    batch = _filter_tasks(batch, tasks)
    n = batch.num_rows
    cols = {}
    for field in SOURCE_SCHEMA:
        if field.name == "source":
            cols["source"] = pa.array([source] * n, pa.string())
        elif field.name in batch.column_names:
            cols[field.name] = batch[field.name].cast(field.type)
        else:
            cols[field.name] = pa.nulls(n, field.type)
    return pa.table(cols, schema=SOURCE_SCHEMA)


def _parquet(read, path: str, where: str, **kw):
    """read(path, **kw), with a file that is not readable Parquet named in the error."""
    try:
        return read(path, **kw)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{where}: {path} is not a readable Parquet file ({e})") from None


def load_source(spec: SourceSpec, variables: dict[str, str] | None = None) -> pa.Table:
    """One recipe source as a SOURCE_SCHEMA table (task filter and max_rows applied).

    Records are small (image paths, or a few hundred bytes of PNG in the shapes world), so the
    index of a stage's rows is built on the driver; images named by path are read, decoded and
    resized in the preprocessing actors, streamed with the rest of the pass.
    """
    files = source_files(spec, variables)
    where = f"source {spec.name!r}"
    image_root = resolve_path(spec.image_root, variables, where=f"{where}.image_root") if spec.image_root else None
    if all(f.endswith(".parquet") for f in files):
        schema = _parquet(pq.read_schema, files[0], where)
        if "messages" in schema.names:  # record-schema Parquet (the shapes world, or converted data)
            tables = []
            for f in files:
                check_schema(_parquet(pq.read_schema, f, where), where=f)
                t = _parquet(pq.read_table, f, where, columns=[c for c in SOURCE_SCHEMA.names if c in schema.names])
                tables.append(_from_record_parquet(t, spec.name, spec.tasks))
            table = pa.concat_tables(tables)
        elif spec.format == "preference":  # RLAIF-V Parquet
            rows = [r for f in files for r in _parquet(pq.read_table, f, where).to_pylist()]
            table = _filter_tasks(records_table(
                preference_record(r, source=spec.name, index=i, image_root=image_root) for i, r in enumerate(rows)), spec.tasks)
        else:
            raise ValueError(f"{where} ({spec.format}): {files[0]} has no 'messages' column "
                             f"(expected the record schema, datasets/README.md)")
    else:
        raw = [r for f in files for r in _load_json(f)]
        make = preference_record if spec.format == "preference" else llava_record
        table = _filter_tasks(records_table(make(r, source=spec.name, index=i, image_root=image_root)
                                            for i, r in enumerate(raw)), spec.tasks)
    if spec.max_rows is not None:
        table = table.slice(0, spec.max_rows)
    return table
