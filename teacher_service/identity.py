"""Who the teacher is: a tokenizer hash and a model id, stamped on every response.

Distillation compares distributions over token ids, so a student must never consume answers from a
teacher with a different tokenizer, and a run should know which weights taught it. The student side
computes `tokenizer_hash` of its own tokenizer with this very function and compares.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

__all__ = ["tokenizer_hash", "model_id", "TokenizerHashMismatch"]

_SPECIAL_ATTRS = ("pad_token", "eos_token", "bos_token", "unk_token", "image_token")
_FULL_HASH_LIMIT = 2 << 30  # hash every weight byte up to 2 GiB of checkpoint; above, headers + samples


class TokenizerHashMismatch(ValueError):
    """Teacher and student (or data plane) tokenize differently: refused before any training step."""


def tokenizer_hash(tokenizer) -> str:
    """"tok-" + 16 hex of sha256 over the vocab (token -> id), the added tokens and the special tokens.

    Independent of file layout and of how the tokenizer was loaded (built in memory or from disk).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # accept a processor too
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    added = sorted((t, int(i)) for t, i in (tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}).items())
    special = {a: (None if getattr(tok, a, None) is None else str(getattr(tok, a))) for a in _SPECIAL_ATTRS}
    blob = json.dumps({"vocab": vocab, "added": added, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "tok-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _hash_weights(h, path: Path, full: bool) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if full:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
            return
        if path.suffix == ".safetensors":  # the header names every tensor with dtype, shape and offsets
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, 1 << 26)))
        f.seek(0)
        h.update(f.read(1 << 24))
        f.seek(max(0, size - (1 << 24)))
        h.update(f.read(1 << 24))


def model_id(path: str | Path, name: str | None = None) -> str:
    """"<name>@<16 hex>": a content hash of config.json and the weight files of a local HF checkpoint.

    Checkpoints up to 2 GiB are hashed completely; larger ones by file sizes, safetensors headers and
    the first and last 16 MiB of each file (fast, and still different for any retrained weights in
    practice). `name` defaults to the directory name.
    """
    p = Path(path)
    h = hashlib.sha256()
    cfg = p / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    weights = sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".bin", ".pt") and x.is_file())
    full = sum(x.stat().st_size for x in weights) <= _FULL_HASH_LIMIT
    for w in weights:
        _hash_weights(h, w, full)
    return f"{name or p.resolve().name}@{h.hexdigest()[:16]}"
