"""Teacher annotation against a real tiny teacher on Serve, the teacher-output cache, and feeding a
TorchTrainer: the second pass over a cached dataset makes zero teacher calls (counted in the service)."""
import dataclasses
import json
import uuid

import numpy as np
import pytest
import torch

from actors import columns as C
from actors.annotate import row_positions, row_requests
from actors.cache import CacheKey, CacheMismatchError
from actors.pipeline import DataPlaneConfig, build_stage_data
from actors.preprocess import ProcessorSpec
from actors.recipe import load_recipe

APP = "data-plane-teacher"
TOP_K = 16


@pytest.fixture(scope="module")
def teacher(ray_cluster, tmp_path_factory):
    from teacher_service.app import ServiceConfig, deploy, shutdown
    from teacher_service.client import TeacherClient
    from teacher_service.testing import save_tiny_teacher

    path = save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")
    deploy(ServiceConfig(model=str(path), name=APP, num_cpus=0.5, torch_threads=1, max_ongoing_requests=16,
                         max_queued_requests=64))
    yield path, TeacherClient(APP)
    shutdown(APP)


@pytest.fixture(scope="module")
def recipe():
    """The shapes recipe with a few rows per stage (dft: MDist + RDist; preference: DPO reference)."""
    r = load_recipe("datasets/shapes.yaml")
    small = {}
    for stage, rows in (("dft", 12), ("preference", 4)):
        spec = r.stages[stage]
        small[stage] = dataclasses.replace(spec, sources=(dataclasses.replace(spec.sources[0], max_rows=rows),))
    return dataclasses.replace(r, stages=small)


def _build(recipe, stage, world, cache, **kw):
    key = kw.pop("key", None)
    config = DataPlaneConfig(batch_size=4, preprocess_actors=(1, 1), top_k=kw.pop("top_k", TOP_K))
    return build_stage_data(recipe, stage, processor=ProcessorSpec(tokenizer=str(world / "tokenizer")),
                            out_dir=cache.parent / "stages" / stage, variables={"world": str(world)}, teacher_app=APP,
                            cache_dir=cache, config=config, key=key, **kw)


def _reference(teacher_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(teacher_path).eval(), AutoProcessor.from_pretrained(teacher_path)


def test_annotation_cache_and_feeding(teacher, recipe, shapes_world, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config):
        """One pass over this worker's shard through the feeding helper (nested: pickled by value,
        since Ray Train workers cannot import the tests)."""
        import ray.train

        from actors.feeding import train_batches

        rank = ray.train.get_context().get_world_rank()
        ids, checks = [], []
        for batch in train_batches(batch_size=4, pad_id=config["pad_id"], ledger=config["ledger"]):
            ids += batch[C.ID]
            # the teacher's concatenated top-k rows line up with the collate's teacher_mask
            checks.append(int(batch["teacher_mask"].sum()) == batch[C.TEACHER_TOPK_IDS].shape[0]
                          and batch[C.TEACHER_RELATION].shape[1:] == (36, 36)
                          and batch[C.INPUT_IDS].shape == batch[C.LABELS].shape)
        with open(f"{config['out']}/rank{rank}.json", "w") as f:
            json.dump({"ids": ids, "checks": checks}, f)
        ray.train.report({"rows": len(ids)})

    teacher_path, client = teacher
    cache = tmp_path / "teacher_cache"
    before = client.server_stats()["requests"]

    # Pass 1: every row goes to the teacher, and into the cache.
    data = _build(recipe, "dft", shapes_world, cache)
    assert data.plan.positions == ("mdist",) and data.plan.relation and data.key.top_k == TOP_K
    rows = data.dataset.take_all()
    first = data.close_pass()
    calls = client.server_stats()["requests"] - before
    assert len(rows) == 12 and first["teacher_rows"] == 12 and first["cache_hits"] == 0 and calls == 12
    assert first["rows_in"] == first["rows_out"] + first["rows_rejected"] == 12

    model, processor = _reference(teacher_path)
    image_token_id = processor.tokenizer.image_token_id
    from teacher_service.testing import reference_scores

    for row in rows[:3]:
        pos = row_positions(row, ("mdist",), image_token_id)
        np.testing.assert_array_equal(row[C.TEACHER_POSITIONS], pos)
        assert row[C.TEACHER_TOPK_IDS].shape == (len(pos), TOP_K) and row[C.TEACHER_TOPK_LOGPROBS].dtype == np.float16
        assert row[C.TEACHER_MODEL_ID] == data.key.teacher_model_id
        ref = reference_scores(model, processor, row_requests(row, data.plan, pos)[0])
        want = np.sort(ref["logprobs"], axis=-1)[:, ::-1][:, :TOP_K]
        np.testing.assert_allclose(row[C.TEACHER_TOPK_LOGPROBS].astype(np.float32), want, atol=2e-2)
        tail = np.log1p(-np.exp(want).sum(-1).clip(max=1 - 1e-7))
        np.testing.assert_allclose(row[C.TEACHER_TAIL_LOGMASS], tail, atol=2e-2)
        vis = torch.tensor(ref["visual_logits"][0])
        np.testing.assert_allclose(row[C.TEACHER_RELATION], (vis @ vis.T).numpy(), rtol=1e-3, atol=1e-2)

    # Pass 2, as a new run would: a TorchTrainer with two workers fed from the cached dataset.
    again = _build(recipe, "dft", shapes_world, cache)
    before = client.server_stats()["requests"]
    out = tmp_path / "train"
    out.mkdir()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"pad_id": processor.tokenizer.pad_token_id, "ledger": again.ledger, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets=again.trainer_datasets(),
        run_config=RunConfig(name=f"data-feed-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    assert client.server_stats()["requests"] - before == 0  # zero teacher calls, counted in the service
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    fed = ranks[0]["ids"] + ranks[1]["ids"]
    assert sorted(fed) == sorted(r[C.ID] for r in rows) and all(c for r in ranks for c in r["checks"])
    stats = json.loads((tmp_path / "stages" / "dft" / "data_stats.json").read_text())
    second = stats["passes"][-1]  # closed by rank 0 when its shard ended
    assert second["cache_hits"] == 12 and second["teacher_rows"] == 0 and not second["problems"]

    # Hybrid: four more rows -> 12 hits from the cache, 4 misses to the teacher (and into the cache).
    spec = recipe.stages["dft"]
    more = dataclasses.replace(recipe, stages={"dft": dataclasses.replace(
        spec, sources=(dataclasses.replace(spec.sources[0], max_rows=16),))})
    before = client.server_stats()["requests"]
    grown = _build(more, "dft", shapes_world, cache)
    assert len(grown.dataset.take_all()) == 16
    third = grown.close_pass()
    assert (third["cache_hits"], third["teacher_rows"]) == (12, 4) and client.server_stats()["requests"] - before == 4

    # A cache written for another k, or another teacher, is refused before any work.
    with pytest.raises(CacheMismatchError, match=rf"top_k: cache has {TOP_K}, this run has 8"):
        _build(recipe, "dft", shapes_world, cache, top_k=8)
    other = CacheKey("another-teacher@0123456789abcdef", data.key.tokenizer_hash, TOP_K)
    with pytest.raises(CacheMismatchError, match="teacher_model_id: cache has"):
        _build(recipe, "dft", shapes_world, cache, key=other)


def test_preference_rows_carry_the_teachers_sequence_logprobs(teacher, recipe, shapes_world, tmp_path):
    teacher_path, _ = teacher
    data = _build(recipe, "preference", shapes_world, tmp_path / "teacher_cache")
    rows = data.dataset.take_all()
    data.close_pass()
    assert len(rows) == 4
    model, _ = _reference(teacher_path)
    from student.losses import sequence_logps

    for row in rows[:2]:
        pv = torch.tensor(row[C.PIXEL_VALUES])[None]
        for ids, labels, got in ((C.CHOSEN_INPUT_IDS, C.CHOSEN_LABELS, C.TEACHER_CHOSEN_LOGP),
                                 (C.REJECTED_INPUT_IDS, C.REJECTED_LABELS, C.TEACHER_REJECTED_LOGP)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(row[ids], dtype=torch.long)[None], pixel_values=pv).logits
            want = float(sequence_logps(logits.float(), torch.tensor(row[labels], dtype=torch.long)[None])[0])
            assert row[got] == pytest.approx(want, abs=1e-3) and row[got] < 0
