"""Stage checkpoints through Ray Train: the DeepSpeed engine state plus where the data stream was.

Layout of one checkpoint folder (Ray merges the files every rank writes into it):
    ds/...                      DeepSpeed `save_checkpoint(tag="ds")`: module states (rank 0) and each
                                rank's ZeRO optimizer shard
    train_state.json            step, epoch, world size, global batch (rank 0)
    consumed-rank{r}.json       ids of the samples rank r trained on in the current epoch

Resume. Ray Train does not save the data iterator, so the ids consumed in the current epoch are
saved and skipped on resume (every rank skips the union, whichever shard a sample lands in): every
sample is seen once per epoch. Same world size: the full engine state (weights, Adam moments) is
restored. Different world size (elastic resize): ZeRO optimizer shards are partitioned by the old
data-parallel size and do not load, so the resume is **weights-only**: module weights are loaded,
the Adam moments start from zero, and the step counter, learning-rate schedule position and consumed
samples continue. (DeepSpeed universal checkpoints would keep the moments; they need an offline
conversion pass per resize, which we do not do.)

Crash safety (a process killed in the middle of a save). Each rank assembles its part in a local
staging folder (`staging_dir`), then `ray.train.report` copies the folder into storage, inside the
call, before the report is sent. A checkpoint is what a restart loads only once Ray Train's
controller has registered it, at its next poll of the workers; the controller then writes
checkpoint_manager_snapshot.json (what `--resume` from a new driver reads) before it deletes
checkpoints beyond num_to_keep. A kill while DeepSpeed writes the staging folder, while Ray copies
it, or before the controller registered it leaves at most an unregistered folder in storage that is
never loaded: the restart loads the previous checkpoint (tests/test_reliability_checkpoint_kill.py).
A killed save's staging folder is removed by the rank's next save, so crashes do not pile up copies.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["DS_TAG", "TrainState", "restore_checkpoint", "resume_message", "save_checkpoint", "staging_dir"]

DS_TAG = "ds"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done in this stage
    epoch: int = 0
    world_size: int = 1
    global_batch: int = 1
    consumed: set = field(default_factory=set)  # sample ids trained on in the current epoch


def staging_dir(run_name: str, rank: int) -> Path:
    """Where a rank assembles a checkpoint before Ray copies it to storage: node-local, one per
    (run, rank), so the next save finds and removes what a killed save left."""
    return Path(tempfile.gettempdir()) / "mod-distill-ckpt" / f"{run_name}-rank{rank}"


def save_checkpoint(engine, state: TrainState, rank: int, metrics: dict) -> None:
    """Every rank: DeepSpeed save, own consumed ids, barrier, ray.train.report (itself a barrier)."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    tmp = staging_dir(ray.train.get_context().get_experiment_name(), rank)
    shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    tmp.mkdir(parents=True)
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        (Path(tmp) / f"consumed-rank{rank}.json").write_text(json.dumps(sorted(state.consumed)))
        if rank == 0:
            meta = {k: v for k, v in asdict(state).items() if k != "consumed"}
            (Path(tmp) / "train_state.json").write_text(json.dumps(meta))
        if dist.is_initialized():
            dist.barrier()
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch},
                         checkpoint=Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_checkpoint(engine, checkpoint, world_size: int) -> tuple[TrainState, bool]:
    """(the state as saved, weights_only) from a Ray checkpoint; loads the engine in place: whole at
    the saved world size, module weights only at another one."""
    with checkpoint.as_directory() as d:
        d = Path(d)
        meta = json.loads((d / "train_state.json").read_text())
        consumed: set = set()
        for f in sorted(d.glob("consumed-rank*.json")):
            consumed.update(json.loads(f.read_text()))
        same = meta["world_size"] == world_size
        if same:
            engine.load_checkpoint(str(d), tag=DS_TAG)
        else:
            engine.load_checkpoint(str(d), tag=DS_TAG, load_module_only=True, load_optimizer_states=False,
                                   load_lr_scheduler_states=False)
    state = TrainState(step=meta["step"], epoch=meta["epoch"], world_size=meta["world_size"],
                       global_batch=meta["global_batch"], consumed=consumed)
    return state, not same


def resume_message(stage: str, saved: TrainState, world_size: int, global_batch: int, recipe_batch: int) -> str:
    """The log line of a resume: full, or weights-only after a change of world size (and the global
    batch before and after; it differs from the recipe's when the world size does not divide it)."""
    if saved.world_size == world_size:
        return f"[{stage}] resume from the checkpoint of step {saved.step}: full engine state, world {world_size}"
    note = "" if global_batch == recipe_batch else f" (recipe: {recipe_batch}, not divisible by {world_size} workers)"
    return (f"[{stage}] world size changed {saved.world_size} -> {world_size}: weights-only resume from the "
            f"checkpoint of step {saved.step} (module weights loaded, Adam moments restart from zero; step "
            f"counter, LR schedule and consumed samples continue); global batch {saved.global_batch} -> "
            f"{global_batch}{note}")
