"""The teacher-output cache: round trip, and refusal of a cache keyed for another teacher or k."""
import json

import numpy as np
import pytest

from actors.cache import (
    CacheKey,
    CacheMismatchError,
    CacheMissError,
    TeacherCache,
    content_hash,
)
from actors.rejects import balance_problems


def _entry(h, p=5, k=4, rel=True):
    rng = np.random.default_rng(abs(hash(h)) % 2**32)
    return {"content_hash": h, "id": h, "positions": np.arange(p, dtype=np.int32),
            "topk_ids": rng.integers(0, 100, (p, k)).astype(np.int32),
            "topk_logprobs": -rng.random((p, k)).astype(np.float16), "tail_logmass": -rng.random(p).astype(np.float32),
            "relation": rng.random((3, 3)).astype(np.float32) if rel else None, "chosen_logp": None, "rejected_logp": None}


def test_round_trip_and_hybrid_lookup(tmp_path):
    key = CacheKey("teacher@abc", "tok-1", top_k=4)
    cache = TeacherCache(tmp_path, key).open()
    entries = [_entry("h1"), _entry("h2", p=0, rel=False)]
    cache.write(entries)
    fresh = TeacherCache(tmp_path, key).open()  # another actor, another pass
    got = fresh.lookup(["h1", "h2", "h3"])
    assert set(got) == {"h1", "h2"} and len(fresh) == 2
    for name in ("positions", "topk_ids", "topk_logprobs", "tail_logmass", "relation"):
        np.testing.assert_array_equal(got["h1"][name], entries[0][name])
        assert got["h1"][name].dtype == entries[0][name].dtype
    assert got["h2"]["topk_ids"].shape == (0, 4) and got["h2"]["relation"] is None
    assert json.loads((tmp_path / "manifest.json").read_text())["teacher_model_id"] == "teacher@abc"


@pytest.mark.parametrize("other, field", [
    (CacheKey("teacher@def", "tok-1", top_k=4), "teacher_model_id"),
    (CacheKey("teacher@abc", "tok-1", top_k=8), "top_k"),
    (CacheKey("teacher@abc", "tok-2", top_k=4), "tokenizer_hash"),
])
def test_a_cache_for_another_teacher_or_k_is_refused(tmp_path, other, field):
    TeacherCache(tmp_path, CacheKey("teacher@abc", "tok-1", top_k=4)).open().write([_entry("h1")])
    for mode in ("hybrid", "read"):
        with pytest.raises(CacheMismatchError, match=rf"{field}: cache has .* this run has"):
            TeacherCache(tmp_path, other, mode).open()


def test_read_mode_needs_a_cache(tmp_path):
    with pytest.raises(CacheMissError, match="holds no teacher cache"):
        TeacherCache(tmp_path / "none", CacheKey("t", "k", 4), "read").open()


def test_content_hash_sees_every_input():
    ids, pv = np.arange(10, dtype=np.int32), np.zeros((3, 4, 4), np.float32)
    base = content_hash([("ids", ids), ("pv", pv), ("pos", None)])
    assert base == content_hash([("ids", ids.copy()), ("pv", pv.copy()), ("pos", None)])
    pv2 = pv.copy()
    pv2[0, 0, 0] = 1e-6
    assert base != content_hash([("ids", ids), ("pv", pv2), ("pos", None)])
    assert base != content_hash([("ids", ids), ("pv", pv), ("pos", np.arange(3, dtype=np.int32))])
    assert base != content_hash([("ids", ids.astype(np.int64)), ("pv", pv), ("pos", None)])


def test_balance_problems_name_the_operator():
    ok = {"preprocess": {"in": 10, "out": 8, "rejected": 2}, "annotate": {"in": 8, "out": 7, "rejected": 1}}
    assert balance_problems(["preprocess", "annotate"], ok, 10) == []
    lost = {"preprocess": {"in": 10, "out": 8, "rejected": 2}, "annotate": {"in": 7, "out": 7, "rejected": 0}}
    problems = balance_problems(["preprocess", "annotate"], lost, 10)
    assert any("preprocess emitted 8 rows but annotate received 7" in p for p in problems)
    assert balance_problems(["preprocess", "annotate"], lost, 10, complete=False) == []
    assert "planned 12 rows" in balance_problems(["preprocess", "annotate"], ok, 12)[0]
