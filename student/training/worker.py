"""The Ray Train worker loop of one stage: a DeepSpeed engine around the stage's student.

Per step: take the next micro-batch of the worker's dataset shard (time spent waiting for it is the
time waiting on the data plane, i.e. on the teacher's annotations; with the stage's `length_window`,
rows of similar length share a micro-batch, `length_buckets`), pad it (`actors.collate`), run
`stage_step`, backpropagate through the engine, set the learning rate from `schedule.lr_at`, average
the logged metrics over ranks, and log them on rank 0. Checkpoints every `checkpoint_every` steps
and at the end; then rank 0 exports the stage's HF checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from actors import columns as C
from actors.collate import pad_collate
from student.training.checkpoint import TrainState, restore_checkpoint, resume_message, save_checkpoint
from student.training.deepspeed_config import deepspeed_config
from student.training.job import StageJob, total_steps
from student.training.metrics import MetricsLogger, summarize
from student.training.sample_log import SampleLog, sample_summary
from student.training.schedule import lr_at
from student.training.stage_model import stage_output_dir, stage_start_model
from student.training.step import StepContext, stage_step

__all__ = ["fresh_batches", "length_buckets", "train_loop"]


def _take(batch: dict, keep: np.ndarray) -> dict:
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        arrays = [np.asarray(p[k]) for p in parts]
        try:
            out[k] = np.concatenate(arrays)
        except ValueError:  # ragged per-row arrays in differently shaped batches: fall back to object arrays
            flat = [x for a in arrays for x in a]
            obj = np.empty(len(flat), dtype=object)
            obj[:] = flat
            out[k] = obj
    return out


def fresh_batches(batches, consumed: set, size: int):
    """Re-batch a stream of numpy batches into batches of `size` rows, dropping rows whose id is in
    `consumed` (already trained on in this epoch before a restart). A short last batch is yielded too."""
    pending: list[dict] = []
    have = 0
    for batch in batches:
        ids = np.asarray(batch[C.ID])
        keep = np.array([str(i) not in consumed for i in ids], dtype=bool) if consumed else np.ones(len(ids), bool)
        if not keep.all():
            batch = _take(batch, keep)
        n = int(keep.sum())
        if n == 0:
            continue
        pending.append(batch)
        have += n
        while have >= size:
            merged = _concat(pending)
            yield _take(merged, np.arange(size))
            rest = have - size
            pending = [_take(merged, np.arange(size, size + rest))] if rest else []
            have = rest
    if have:
        yield _concat(pending)


def _row_lengths(batch: dict) -> np.ndarray:
    """Tokens per row: the longer of chosen/rejected for preference rows, else input_ids."""
    if C.CHOSEN_INPUT_IDS in batch:
        return np.array([max(len(c), len(r)) for c, r in zip(batch[C.CHOSEN_INPUT_IDS], batch[C.REJECTED_INPUT_IDS])])
    return np.array([len(x) for x in batch[C.INPUT_IDS]])


def length_buckets(batches, window: int, seed: int):
    """Regroup every `window` batches by row length: sort their rows by tokens, cut them into batches of
    the same sizes, and yield those in a seeded random order.

    A batch is padded to its longest row; the shapes world's chats run from ~60 to ~170 tokens, so in
    random batches about a third of the tokens were padding. Same rows, same batch sizes, only who
    shares a batch with whom changes (and only within the window). window <= 1: batches pass through.
    """
    if window <= 1:
        yield from batches
        return
    rng = np.random.default_rng(seed)
    group: list[dict] = []

    def regroup():
        sizes = [len(b[C.ID]) for b in group]
        merged = _concat(group)
        order = np.argsort(_row_lengths(merged), kind="stable")
        cuts = np.cumsum(sizes)[:-1]
        out = [_take(merged, idx) for idx in np.split(order, cuts)]
        return [out[i] for i in rng.permutation(len(out))]

    for batch in batches:
        group.append(batch)
        if len(group) == window:
            yield from regroup()
            group = []
    if group:
        yield from regroup()


def _all_ranks_true(flag: bool) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _reduce_metrics(values: dict, world: int) -> dict:
    """Mean over ranks (tokens: sum), one all_reduce for all keys (every rank logs the same keys)."""
    import torch.distributed as dist

    if not dist.is_initialized() or world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: (v if k == "tokens" else v / world) for k, v in zip(keys, t.tolist())}


def _attempt_id() -> int:
    """One id per start of the worker group, the same on every rank (rank 0's clock): the sample log
    tells a restarted attempt's steps from the ones it supersedes."""
    import torch.distributed as dist

    box = [time.time_ns()]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _export(engine, processor, out_dir: Path, rank: int, zero_stage: int) -> None:
    """Rank 0 writes the HF checkpoint; under ZeRO-3 every rank first gathers the partitioned weights."""
    import torch.distributed as dist

    from student.model import export

    model = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                export(model, processor, out_dir)
    elif rank == 0:
        export(model, processor, out_dir)
    if dist.is_initialized():
        dist.barrier()


def _close_pass(ledger, rank: int, complete: bool) -> None:
    """Rank 0 closes the data plane's pass on its ledger (balance and reject-rate checks raise here).
    A pass the trainer stopped early, or resumed in the middle, is not complete."""
    if ledger is not None and rank == 0:
        from actors.rejects import close_pass

        close_pass(ledger, complete)


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker; config = {"job": StageJob, "ledger": the data plane's
    DataLedger handle or None}."""
    import deepspeed
    import ray.train

    from student.model import RouterRecorder, apply_trainable, is_moe

    t_enter = time.time()
    job: StageJob = config["job"]
    ledger = config.get("ledger")
    spec = job.spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    torch.manual_seed(job.seed + rank)
    run_dir = Path(job.run_dir)

    model, processor = stage_start_model(job.stage, run_dir, job.recipe)
    trainable = apply_trainable(model, job.stage)
    model.train()
    recorder = RouterRecorder(model).attach() if is_moe(model) else None
    tok = processor.tokenizer
    ground = {}
    if spec.loss.ground > 0:  # the grounding loss reads attention weights, which only eager attention returns
        from actors.shapes.grounding import token_words

        model.set_attn_implementation("eager")
        vcfg = model.config.vision_config
        ground = dict(ground_words=tuple(token_words(tok)), patches_per_side=vcfg.image_size // vcfg.patch_size)
    step_ctx = StepContext(vocab_size=len(tok), image_token_id=int(tok.image_token_id),
                           pad_token_id=int(tok.pad_token_id), gather_head=job.zero_stage == 3, **ground)

    micro = max(1, spec.batch_size // world)
    global_batch = micro * world
    steps = total_steps(spec, job.rows, global_batch, job.max_steps)
    ds_cfg = deepspeed_config(spec.optim, zero_stage=job.zero_stage, micro_batch=micro, world_size=world,
                              bf16=job.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_cfg)

    state = TrainState(world_size=world, global_batch=global_batch)
    weights_only, resumed_from = False, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        saved, weights_only = restore_checkpoint(engine, checkpoint, world)
        resumed_from = {"step": saved.step, "world_size": saved.world_size, "global_batch": saved.global_batch}
        if rank == 0:
            print(resume_message(job.stage, saved, world, global_batch, spec.batch_size), flush=True)
        state = dataclasses.replace(saved, world_size=world, global_batch=global_batch)
    saved_step = state.step if checkpoint is not None else -1

    logger = MetricsLogger(run_dir, job.stage, steps, start_step=state.step, enabled=rank == 0,
                           progress=job.progress)
    stage_dir = run_dir / "stages" / job.stage
    samples = SampleLog(stage_dir, rank, _attempt_id(), state.step)
    if rank == 0:
        how = "fresh" if checkpoint is None else ("weights-only resume" if weights_only else "resume")
        print(f"[{job.stage}] {how} at step {state.step}/{steps}: world {world} x micro-batch {micro}, "
              f"ZeRO-{job.zero_stage}, {sum(p.numel() for p in params):,} trainable params "
              f"in {len(trainable)} tensors", flush=True)

    shard = ray.train.get_dataset_shard("train")
    device = engine.device
    t_stage = time.time()
    setup_s = t_stage - t_enter  # model build, deepspeed.initialize, checkpoint restore
    last_loss = float("nan")
    while state.step < steps:
        batches = shard.iter_batches(batch_size=micro, batch_format="numpy",
                                     local_shuffle_buffer_size=job.shuffle_buffer or None,
                                     local_shuffle_seed=job.seed * 1000 + state.epoch if job.shuffle_buffer else None)
        resumed_pass = bool(state.consumed)
        stream = length_buckets(fresh_batches(batches, state.consumed, micro), job.spec.length_window,
                                seed=(job.seed * 1000 + state.epoch) * 1000 + rank)
        stepped = False
        while state.step < steps:
            t0 = time.perf_counter()
            raw = next(stream, None)
            wait = time.perf_counter() - t0
            if not _all_ranks_true(raw is not None):
                break
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in pad_collate(raw, step_ctx.pad_token_id).items()}
            _set_lr(optimizer, lr_at(state.step, steps, spec.optim.lr, spec.optim.warmup_ratio, spec.optim.schedule))
            loss, logged = stage_step(engine.module, batch, job.stage, spec.loss, step_ctx, recorder)
            engine.backward(loss)
            engine.step()
            state.consumed.update(str(i) for i in raw[C.ID])
            state.step += 1
            samples.write(state.step, state.epoch, raw[C.ID])
            stepped = True
            dt = time.perf_counter() - t0
            logged.update(time_s=dt, teacher_wait_s=wait)
            logged = _reduce_metrics(logged, world)
            tokens = logged.pop("tokens")
            last_loss = logged["loss/total"]
            logger.log(state.step, {"epoch": state.epoch, "world_size": world, "lr": optimizer.param_groups[0]["lr"],
                                    "tokens_per_s": tokens / max(dt, 1e-9), **logged})
            if job.checkpoint_every and state.step % job.checkpoint_every == 0 and state.step < steps:
                save_checkpoint(engine, state, rank, {"loss": last_loss})
                saved_step = state.step
        else:
            _close_pass(ledger, rank, complete=False)  # stopped at the step budget, mid-pass
            break
        _close_pass(ledger, rank, complete=not resumed_pass)
        if not stepped:
            raise RuntimeError(f"stage {job.stage!r}: epoch {state.epoch} produced no batch on some rank "
                               f"(empty dataset, or fewer rows than workers?)")
        state.epoch += 1
        state.consumed = set()

    wall = time.time() - t_stage
    if saved_step != state.step:
        save_checkpoint(engine, state, rank, {"loss": last_loss})
    if recorder is not None:
        recorder.detach()
    samples.close()
    out = stage_output_dir(run_dir, job.stage)
    _export(engine, processor, out, rank, job.zero_stage)  # ends with a barrier: every rank's log is complete
    if rank == 0:
        import json

        summary = summarize(logger.records, wall)
        summary.update(setup_s=setup_s, entered_at=t_enter, finished_at=time.time(), world_size=world, micro_batch=micro, zero_stage=job.zero_stage, total_steps=steps,
                       resumed_weights_only=weights_only, resumed_from=resumed_from, output=str(out),
                       samples=sample_summary(stage_dir))
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.close()
