"""The pieces the benchmarks rely on: the no-op teacher backend, the demo's per-stage spans, run_all's opt-in."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from teacher_service.backends import create_backend
from teacher_service.protocol import Limits, validate
from teacher_service.testing import sample_requests, save_tiny_teacher

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_noop_backend_answers_like_the_hf_one_without_a_forward(tmp_path):
    model = save_tiny_teacher(tmp_path / "teacher")
    noop, hf = create_backend("noop", str(model)), create_backend("hf", str(model), device="cpu", dtype="float32")
    import dataclasses

    # same identity, vocab, image token and shape: validation behaves the same
    assert dataclasses.replace(noop.info, backend="hf") == hf.info and noop.info.backend == "noop"
    reqs = sample_requests(noop.processor, 3, top_k=16, relation=True)
    for r in reqs:
        validate(r, Limits(), noop.info)
    prepared = [noop.prepare(r, Limits()) for r in reqs]
    assert all(p.images == () and p.pixel_values.shape == (1, *noop.info.image_shape) for p in prepared)
    want = hf.score([hf.prepare(r, Limits()) for r in reqs])
    got = noop.score(prepared)
    for g, w, r in zip(got, want, reqs):
        for f in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs", "relation"):
            assert getattr(g, f).shape == getattr(w, f).shape and getattr(g, f).dtype == getattr(w, f).dtype, f
        assert g.request_id == r.request_id and isinstance(g.sequence_logprob, float)
        # a valid distribution: k entries plus the tail hold all the mass
        mass = np.exp(g.topk_logprobs.astype(np.float64)).sum(1) + np.exp(g.tail_logmass.astype(np.float64))
        np.testing.assert_allclose(mass, 1.0, atol=1e-2)


def test_demo_spans_attribute_every_second_to_a_stage():
    demo = _bench_module("demo_wall_time")
    lines = [(5.0, "run directory: runs/x"), (20.0, "ray: local; stages: teacher -> init"),
             (90.0, "stage teacher: 100 rows per epoch"), (150.0, "stage teacher: checkpoint /r"),
             (170.0, "eval teacher after teacher: {...}"), (200.0, "stage init: 3 rows per epoch"),
             (260.0, "eval student after init: {...}"), (261.0, "report: r.md")]
    out = demo.spans(lines, ["teacher", "init"], end=270.0)
    assert out == {"setup_s": 20.0, "stages": {"teacher": 150.0, "init": 90.0}, "report_s": 10.0}
    assert out["setup_s"] + sum(out["stages"].values()) + out["report_s"] == 270.0
    assert demo.stage_of("stage d2d: checkpoint", ["d2d"]) == "d2d" and demo.stage_of("stage x: y", ["d2d"]) is None


def test_run_all_leaves_the_demo_out_unless_asked():
    run_all = _bench_module("run_all")
    names = run_all.all_benches()
    assert {"demo_wall_time", "serve_cost", "teacher_wire_bytes", "topk_vs_full_kd"} <= set(names)
    assert "_shapes" not in names  # helpers are not benches
    default = run_all.select(names, None, [], with_demo=False)
    assert "demo_wall_time" not in default and "serve_cost" in default
    assert "demo_wall_time" in run_all.select(names, None, [], with_demo=True)
    assert run_all.select(names, ["demo_wall_time"], [], with_demo=False) == ["demo_wall_time"]
    assert "serve_cost" not in run_all.select(names, None, ["serve_cost"], with_demo=False)
    with pytest.raises(ValueError, match="unknown bench"):
        run_all.select(names, ["nope"], [], with_demo=False)
