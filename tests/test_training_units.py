"""The trainer's pure parts, without Ray: step objective vs the losses on full logits, LR schedule,
DeepSpeed config, worker-count parsing, step budget, resume-time re-batching, summaries."""
import numpy as np
import pytest
import torch

from actors import columns as C
from actors.collate import pad_collate
from actors.recipe import LossSpec, OptimSpec, StageSpec
from student.training.checkpoint import TrainState, resume_message
from student.training.deepspeed_config import deepspeed_config
from student.training.job import total_steps
from student.training.metrics import format_summary, summarize
from student.training.schedule import lr_at
from student.training.trainer import Workers, parse_workers, worker_resources
from student.training.worker import fresh_batches, length_buckets


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 1e-3, 0.03) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-6
    assert lr_at(50, 100, 1e-3, 0.0, "constant") == 1e-3
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1e-3, schedule="step")


def test_deepspeed_config_follows_the_recipe():
    cfg = deepspeed_config(OptimSpec(lr=2e-5, betas=(0.9, 0.98), eps=1e-6), zero_stage=2, micro_batch=4, world_size=2)
    opt = cfg["optimizer"]["params"]
    assert cfg["train_batch_size"] == 8 and cfg["zero_optimization"]["stage"] == 2 and not cfg["bf16"]["enabled"]
    assert opt["torch_adam"] and opt["betas"] == [0.9, 0.98] and opt["eps"] == 1e-6 and opt["lr"] == 2e-5
    assert deepspeed_config(OptimSpec(), zero_stage=3, micro_batch=1, world_size=1, bf16=True)["bf16"]["enabled"]
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(OptimSpec(), zero_stage=4, micro_batch=1, world_size=1)


def test_workers_flag():
    assert parse_workers("2") == Workers(2, 2) and not parse_workers(2).elastic
    w = parse_workers("1:4")
    assert w.elastic and w.scaling() == (1, 4)
    for bad in ("0", "3:2", "a", "1:b"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad)


def test_worker_resources_follow_the_pool_and_the_gpu_flag():
    assert worker_resources(False, {"CPU": 8}) == {"CPU": 1.0}
    # a cluster with the student pool: one unit per worker, so Ray Train counts workers by the pool
    assert worker_resources(False, {"CPU": 8, "student_gpu": 2}) == {"CPU": 1.0, "student_gpu": 1.0}
    # the GPU follows --gpu, never the cluster (Ray Train refuses a GPU in a CPU run's resources)
    assert worker_resources(False, {"CPU": 8, "GPU": 4, "student_gpu": 4}) == {"CPU": 1.0, "student_gpu": 1.0}
    assert worker_resources(True, {"CPU": 8, "GPU": 4, "student_gpu": 4}) == {"CPU": 1.0, "GPU": 1.0,
                                                                             "student_gpu": 1.0}
    assert worker_resources(False, {"CPU": 8}, placement="require") == {"CPU": 1.0, "student_gpu": 1.0}
    assert worker_resources(False, {"CPU": 8, "student_gpu": 2}, placement="off") == {"CPU": 1.0}


def test_resume_message_says_whether_the_resume_is_full_or_weights_only():
    saved = TrainState(step=30, epoch=0, world_size=1, global_batch=4)
    assert resume_message("init", saved, 1, 4, 4) == (
        "[init] resume from the checkpoint of step 30: full engine state, world 1")
    grown = resume_message("init", saved, 2, 4, 4)
    assert "world size changed 1 -> 2: weights-only resume from the checkpoint of step 30" in grown
    assert grown.endswith("global batch 4 -> 4")
    odd = resume_message("init", TrainState(step=6, world_size=2, global_batch=6), 4, 8, 6)
    assert odd.endswith("global batch 6 -> 8 (recipe: 6, not divisible by 4 workers)")


def test_step_budget():
    spec = StageSpec(sources=(), epochs=2.0, batch_size=8)
    assert total_steps(spec, rows=100, global_batch=8) == 24
    assert total_steps(spec, rows=100, global_batch=8, max_steps=500) == 500  # --max-steps: more epochs
    assert total_steps(StageSpec(sources=(), epochs=2.0, max_steps=5), rows=100, global_batch=8) == 5


def _numpy_batches(ids, size):
    for i in range(0, len(ids), size):
        chunk = ids[i:i + size]
        yield {C.ID: np.array(chunk, dtype=object), "x": np.array([int(c[1:]) for c in chunk])}


def test_fresh_batches_skip_consumed_ids_and_keep_every_other_row_once():
    ids = [f"r{i}" for i in range(23)]
    consumed = {f"r{i}" for i in range(0, 23, 3)}
    out = list(fresh_batches(_numpy_batches(ids, 5), consumed, 4))
    seen = [str(i) for b in out for i in b[C.ID]]
    assert sorted(seen) == sorted(set(ids) - consumed) and len(seen) == len(set(seen))
    assert [len(b[C.ID]) for b in out][:-1] == [4] * (len(out) - 1)
    assert all(list(b["x"]) == [int(i[1:]) for i in b[C.ID]] for b in out)  # columns stay aligned


def test_length_buckets_group_rows_of_similar_length_and_keep_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=64)

    def batches():
        for s in range(0, 64, 8):
            yield {C.ID: np.array([f"r{i}" for i in range(s, s + 8)], dtype=object),
                   C.INPUT_IDS: np.array([np.zeros(n, np.int32) for n in lengths[s:s + 8]] + [None], dtype=object)[:-1]}

    def padded(bs):
        return sum(len(b[C.ID]) * max(len(x) for x in b[C.INPUT_IDS]) for b in bs)

    plain, grouped = list(batches()), list(length_buckets(batches(), window=4, seed=1))
    assert sorted(str(i) for b in grouped for i in b[C.ID]) == sorted(str(i) for b in plain for i in b[C.ID])
    assert [len(b[C.ID]) for b in grouped] == [8] * 8
    assert all([len(x) for x in b[C.INPUT_IDS]] == [int(lengths[int(str(i)[1:])]) for i in b[C.ID]] for b in grouped)
    assert padded(grouped) < 0.8 * padded(plain)  # less padding
    assert [list(b[C.ID]) for b in length_buckets(batches(), window=4, seed=1)] == [list(b[C.ID]) for b in grouped]
    assert [list(b[C.ID]) for b in length_buckets(batches(), window=1, seed=1)] == [list(b[C.ID]) for b in plain]


def test_summary_table():
    recs = [{"stage": "d2s", "step": i + 1, "time_s": 0.1, "tokens_per_s": 100.0, "teacher_wait_s": 0.01,
             "loss/total": 5.0 - i, "loss/ce": 4.0 - i} for i in range(20)]
    s = summarize(recs, wall_s=2.0)
    assert s["steps"] == 20 and s["terms"]["loss/total"]["first"] > s["terms"]["loss/total"]["last"]
    assert "loss/ce" in format_summary("d2s", s) and "20 steps" in format_summary("d2s", s)


# ---------------------------------------------------------------------------------------------------
# stage_step against the loss functions applied to the model's full logits (the reference path)


@pytest.fixture(scope="module")
def setup(shapes_world):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from training_rows import annotated_rows

    from actors.shapes.tokenizer import load_tokenizer
    from student.model import build_processor, build_student, build_teacher, get_preset

    tok = load_tokenizer(shapes_world / "tokenizer")
    proc = build_processor(tok)
    teacher = build_teacher(get_preset("tiny"), tok, seed=1)
    rows = annotated_rows(shapes_world, proc, teacher, ("caption", "vqa"), limit=3)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    batch = pad_collate(cols, tok.pad_token_id)
    student = build_student(get_preset("tiny"), tok, seed=0)
    return tok, batch, student


def test_stage_step_equals_the_losses_on_full_logits(setup):
    from student.losses import TopKTeacher, ce_loss, kd_loss, rdist_loss, select_mask, shift_labels
    from student.training.step import StepContext, stage_step

    tok, batch, model = setup
    ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
    spec = LossSpec(ce=1.0, res=1.0, vis=1.0, rel=0.5)
    with torch.no_grad():
        total, logged = stage_step(model, batch, "dft", spec, ctx)
        logits = model(input_ids=batch[C.INPUT_IDS], attention_mask=batch[C.ATTENTION_MASK],
                       pixel_values=batch[C.PIXEL_VALUES]).logits
    ids, labels, attn = batch[C.INPUT_IDS], batch[C.LABELS], batch[C.ATTENTION_MASK]
    resp = select_mask("response", labels=labels, attention_mask=attn)
    vis = select_mask("visual", input_ids=ids, attention_mask=attn, image_token_id=tok.image_token_id)
    # teacher rows are stored at resp | vis, row-major; pick each term's rows out of them by hand
    index = batch["teacher_mask"].reshape(-1).long().cumsum(0) - 1

    def teacher(mask):
        i = index[mask.reshape(-1)]
        return TopKTeacher(batch[C.TEACHER_TOPK_IDS][i], batch[C.TEACHER_TOPK_LOGPROBS][i], batch[C.TEACHER_TAIL_LOGMASS][i])

    ce = ce_loss(logits[resp], shift_labels(labels)[resp])
    res = kd_loss(logits[resp], teacher(resp))
    vis_l = kd_loss(logits[vis], teacher(vis))
    rel = rdist_loss(logits[vis].reshape(3, -1, logits.shape[-1]), batch[C.TEACHER_RELATION])
    for name, ref in (("ce", ce), ("res", res), ("vis", vis_l), ("rel", rel)):
        assert logged[f"loss/{name}"] == pytest.approx(float(ref), rel=1e-4, abs=1e-6), name
    assert float(total) == pytest.approx(float(ce + res + vis_l + 0.5 * rel), rel=1e-4)


def test_stage_step_names_missing_teacher_data(setup):
    from student.training.step import StepContext, stage_step

    tok, batch, model = setup
    ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
    unannotated = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    with pytest.raises(ValueError, match="teacher top-k rows"):
        stage_step(model, unannotated, "d2d", LossSpec(kd=1.0), ctx)
    shrunk = dict(batch)
    shrunk["teacher_mask"] = batch["teacher_mask"].clone()
    shrunk["teacher_mask"][0, :] = False  # the teacher scored nothing on row 0
    with pytest.raises(ValueError, match="teacher_positions"):
        stage_step(model, shrunk, "d2d", LossSpec(kd=1.0), ctx)


def test_stage_step_skips_terms_weighted_zero(setup):
    """Ablation arms switch a term off by its weight (Table 6's SFT arm: d2s with kd 0; LLaVA-KD's PT: dpt
    with CE only); the data plane then annotates nothing for it, so the step must not ask for teacher rows."""
    from student.losses import ce_loss, select_mask, shift_labels
    from student.training.step import StepContext, stage_step

    tok, batch, model = setup
    ctx = StepContext(vocab_size=len(tok), image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
    unannotated = {k: v for k, v in batch.items() if not k.startswith("teacher")}
    with torch.no_grad():
        logits = model(input_ids=batch[C.INPUT_IDS], attention_mask=batch[C.ATTENTION_MASK],
                       pixel_values=batch[C.PIXEL_VALUES]).logits
        resp = select_mask("response", labels=batch[C.LABELS], attention_mask=batch[C.ATTENTION_MASK])
        ce = float(ce_loss(logits[resp], shift_labels(batch[C.LABELS])[resp]))
        for stage, spec in (("d2s", LossSpec(ce=1.0, kd=0.0)), ("dpt", LossSpec(ce=1.0, res=0.0, vis=0.0, rel=0.0))):
            total, logged = stage_step(model, unannotated, stage, spec, ctx)
            assert float(total) == pytest.approx(ce, rel=1e-5), stage
            assert [k for k in logged if k.startswith("loss/")] == ["loss/ce", "loss/total"], stage
        with pytest.raises(ValueError, match="teacher top-k rows"):  # a weighted term still needs its rows
            stage_step(model, unannotated, "d2s", LossSpec(ce=1.0, kd=1.0), ctx)


def test_a_stage_with_every_term_weighted_zero_fails_before_ray():
    """An all-zero stage would train nothing; run_stages refuses it before starting any Ray work."""
    from dataclasses import replace

    from actors.recipe import load_recipe
    from student.train import DEFAULT_RECIPE
    from student.training.pipeline import check_stage_losses, run_stages

    recipe = load_recipe(DEFAULT_RECIPE)
    check_stage_losses(("init", "d2d", "d2s", "preference"), recipe)  # the shipped recipe passes
    d2s = recipe.stages["d2s"]
    off = replace(recipe, stages={**recipe.stages, "d2s": replace(d2s, loss=replace(d2s.loss, ce=0.0, kd=0.0))})
    check_stage_losses(("init", "d2d"), off)  # a stage not run is not checked
    with pytest.raises(ValueError, match=r"recipe stage 'd2s': .*every term of stage 'd2s' is weighted 0"):
        run_stages(("init", "d2s"), "/nonexistent-run", off, data_fn=None)
