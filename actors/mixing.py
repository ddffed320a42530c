"""Mixing a stage's sources by weight, deterministically for a seed.

An epoch has as many rows as the sources hold together (N = sum n_i); source i contributes about
N * w_i / sum(w) of them, so a small source with a large weight is repeated and a large one with a
small weight is subsampled. Which rows (and how many copies) is decided per row by a hash of
(seed, source, id): no RNG state, and the same rows for the same seed whatever order the sources were read in. The
epoch's order is a sort on another hash of the same kind.
A row repeated k times appears as id, id#1, ..., id#(k-1): ids stay unique within an epoch (the
trainer's resume logic skips consumed ids). `repeat` puts that many copies of the mix in one epoch.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

__all__ = ["mix_rates", "copies", "order_key", "repeat_rows", "mix_sources"]

ORDER = "_order"


def mix_rates(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """Expected copies per row for each source: (N * w_i / sum w) / n_i."""
    if set(sizes) != set(weights):
        raise ValueError(f"sizes and weights name different sources: {sorted(sizes)} vs {sorted(weights)}")
    empty = sorted(k for k, n in sizes.items() if n <= 0)
    if empty:
        raise ValueError(f"source(s) {empty} have no rows (check path, split and tasks)")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"weights must be > 0, got {weights}")
    total, wsum = sum(sizes.values()), sum(weights.values())
    return {k: total * weights[k] / wsum / sizes[k] for k in sizes}


def _uniform(*parts) -> float:
    h = hashlib.blake2b("|".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def copies(row_id: str, rate: float, seed: int, source: str) -> int:
    """floor(rate), plus one more with probability frac(rate) (decided by a hash, not an RNG)."""
    whole = math.floor(rate)
    return whole + int(_uniform("keep", seed, source, row_id) < rate - whole)


def order_key(row_id: str, seed: int, source: str, copy: int) -> int:
    return int(_uniform("order", seed, source, row_id, copy) * 2.0**63)


def repeat_rows(batch: pa.Table, rate: float, seed: int, source: str) -> pa.Table:
    """Each row `copies(...)` times, with `#k` id suffixes on repeats and an `_order` sort key."""
    ids = batch["id"].to_pylist()
    take, new_ids, keys = [], [], []
    for i, rid in enumerate(ids):
        for k in range(copies(rid, rate, seed, source)):
            take.append(i)
            new_ids.append(rid if k == 0 else f"{rid}#{k}")
            keys.append(order_key(rid, seed, source, k))
    out = batch.take(pa.array(np.asarray(take, dtype=np.int64)))
    out = out.set_column(out.schema.get_field_index("id"), "id", pa.array(new_ids, pa.string()))
    return out.append_column(ORDER, pa.array(keys, pa.int64()))


def mix_sources(tables: dict[str, pa.Table], weights: dict[str, float], seed: int, repeat: int = 1):
    """One table mixing `tables` (name -> SOURCE_SCHEMA table) by `weights`, in a seeded order;
    `repeat` copies of that mix in one table (rates scaled by it, copies shuffled together).

    Returns (table, sizes, rates).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    sizes = {name: t.num_rows for name, t in tables.items()}
    rates = {name: rate * repeat for name, rate in mix_rates(sizes, weights).items()}
    mixed = pa.concat_tables([repeat_rows(t, rates[name], seed, name) for name, t in tables.items()])
    order = np.argsort(mixed[ORDER].to_numpy(), kind="stable")
    return mixed.take(pa.array(order)).drop_columns([ORDER]), sizes, rates
