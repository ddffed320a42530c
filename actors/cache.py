"""The teacher-output cache: annotations stored as Parquet, keyed so a wrong teacher can never be read.

One cache folder serves one teacher: `manifest.json` holds the key (teacher model id, tokenizer
hash, top-k k, logprob dtype). Opening a folder written under another key is refused with the
differing fields named; a run must then use another folder or delete this one. Inside, each entry
is keyed by the content hash of the request inputs (token ids, the positions asked for, the pixel
values, whether a relation matrix or sequence log-probs were asked for), so a changed tokenizer,
prompt, image or position policy is a miss, never a stale hit.

Entries are appended as small Parquet files (one per annotated batch, written atomically), so
several annotator actors write concurrently and a run killed halfway keeps what it finished.
Modes: "hybrid" (hits from the cache, misses to the teacher and then into the cache), "read" (cache
only: a miss is an error and no teacher is contacted), "off".
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CACHE_FORMAT",
    "CACHE_MODES",
    "CacheKey",
    "CacheMismatchError",
    "CacheMissError",
    "TeacherCache",
    "content_hash",
    "ENTRY_SCHEMA",
]

CACHE_FORMAT = 1
CACHE_MODES = ("hybrid", "read", "off")

ENTRY_SCHEMA = pa.schema([
    ("content_hash", pa.string()),
    ("id", pa.string()),
    ("positions", pa.binary()),  # int32 [P]
    ("topk_ids", pa.binary()),  # int32 [P, k]
    ("topk_logprobs", pa.binary()),  # float16 [P, k]
    ("tail_logmass", pa.binary()),  # float32 [P]
    ("relation", pa.binary()),  # float32 [Nv, Nv] or null
    ("chosen_logp", pa.float64()),
    ("rejected_logp", pa.float64()),
])


class CacheMismatchError(ValueError):
    """The cache folder was written for another teacher, tokenizer or k."""


class CacheMissError(RuntimeError):
    """cache_mode="read" met a row the cache does not hold."""


@dataclass(frozen=True)
class CacheKey:
    teacher_model_id: str
    tokenizer_hash: str
    top_k: int
    logprobs_dtype: str = "float16"
    format: int = CACHE_FORMAT


def content_hash(arrays: list[tuple[str, np.ndarray | bytes | str | None]]) -> str:
    """sha256 over named inputs (name, dtype, shape, bytes): the per-entry key."""
    h = hashlib.sha256()
    for name, value in arrays:
        h.update(name.encode())
        if value is None:
            h.update(b"\0none")
        elif isinstance(value, (bytes, str)):
            h.update(value.encode() if isinstance(value, str) else value)
        else:
            a = np.ascontiguousarray(value)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:32]


def _bytes(a, dtype) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a, dtype=dtype).tobytes()


class TeacherCache:
    """One teacher's cache folder: manifest check on open, hash index, batched reads and writes."""

    def __init__(self, root: str | Path, key: CacheKey, mode: str = "hybrid"):
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        self.root, self.key, self.mode = Path(root), key, mode
        self._index: dict[str, tuple[str, int]] | None = None
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def open(self) -> "TeacherCache":
        """Check (or, on first use, write) the manifest; refuse a folder keyed for another teacher."""
        if self.mode == "off":
            return self
        if self.manifest_path.exists():
            found = json.loads(self.manifest_path.read_text())
            want = asdict(self.key)
            diff = {k: (found.get(k), v) for k, v in want.items() if found.get(k) != v}
            if diff:
                what = "; ".join(f"{k}: cache has {a!r}, this run has {b!r}" for k, (a, b) in sorted(diff.items()))
                raise CacheMismatchError(
                    f"teacher cache {self.root} was written for another teacher or settings ({what}). Its entries "
                    f"must not be mixed with this teacher's: point the run at another cache folder or delete this one.")
        elif self.mode == "read":
            raise CacheMissError(f"cache_mode=read but {self.root} holds no teacher cache (no manifest.json)")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".manifest.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(asdict(self.key), indent=1))
            try:  # first writer wins; a concurrent writer with the same key is harmless, another key is checked
                os.link(tmp, self.manifest_path)
            except FileExistsError:
                tmp.unlink()
                return self.open()
            tmp.unlink()
        return self

    # -- reading ---------------------------------------------------------------------------
    def files(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.exists() else []

    def _load_index(self) -> dict[str, tuple[str, int]]:
        index: dict[str, tuple[str, int]] = {}
        for f in self.files():
            for i, h in enumerate(pq.read_table(f, columns=["content_hash"])["content_hash"].to_pylist()):
                index.setdefault(h, (str(f), i))
        return index

    def __len__(self) -> int:
        if self._index is None:
            self._index = self._load_index()
        return len(self._index)

    def _table(self, path: str) -> pa.Table:
        if path not in self._tables:
            self._tables[path] = pq.read_table(path)
            while len(self._tables) > 8:
                self._tables.popitem(last=False)
        self._tables.move_to_end(path)
        return self._tables[path]

    def lookup(self, hashes: list[str]) -> dict[str, dict]:
        """The entries (as `decode`d dicts) of the hashes the cache holds."""
        if self.mode == "off":
            return {}
        if self._index is None:
            self._index = self._load_index()
        out = {}
        for h in hashes:
            loc = self._index.get(h)
            if loc is not None and h not in out:
                row = self._table(loc[0]).slice(loc[1], 1).to_pylist()[0]
                out[h] = self.decode(row)
        return out

    def decode(self, row: dict) -> dict:
        k = self.key.top_k
        lp_dtype = np.float16 if self.key.logprobs_dtype == "float16" else np.float32
        out = {"chosen_logp": row["chosen_logp"], "rejected_logp": row["rejected_logp"], "relation": None,
               "positions": None, "topk_ids": None, "topk_logprobs": None, "tail_logmass": None}
        if row["positions"] is not None:
            pos = np.frombuffer(row["positions"], dtype=np.int32)
            out.update(positions=pos,
                       topk_ids=np.frombuffer(row["topk_ids"], dtype=np.int32).reshape(len(pos), k),
                       topk_logprobs=np.frombuffer(row["topk_logprobs"], dtype=lp_dtype).reshape(len(pos), k),
                       tail_logmass=np.frombuffer(row["tail_logmass"], dtype=np.float32))
        if row["relation"] is not None:
            rel = np.frombuffer(row["relation"], dtype=np.float32)
            n = int(round(np.sqrt(rel.size)))
            out["relation"] = rel.reshape(n, n)
        return out

    # -- writing ---------------------------------------------------------------------------
    def write(self, entries: list[dict]) -> Path | None:
        """Append entries ({"content_hash", "id", "positions", "topk_ids", ...}); returns the new file."""
        if self.mode != "hybrid" or not entries:
            return None
        lp_dtype = np.float16 if self.key.logprobs_dtype == "float16" else np.float32
        rows = [{
            "content_hash": e["content_hash"], "id": e.get("id"),
            "positions": _bytes(e.get("positions"), np.int32),
            "topk_ids": _bytes(e.get("topk_ids"), np.int32),
            "topk_logprobs": _bytes(e.get("topk_logprobs"), lp_dtype),
            "tail_logmass": _bytes(e.get("tail_logmass"), np.float32),
            "relation": _bytes(e.get("relation"), np.float32),
            "chosen_logp": e.get("chosen_logp"), "rejected_logp": e.get("rejected_logp"),
        } for e in entries]
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.root / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA), tmp)
        tmp.replace(self.root / name)
        if self._index is not None:
            for i, e in enumerate(entries):
                self._index.setdefault(e["content_hash"], (str(self.root / name), i))
        return self.root / name
