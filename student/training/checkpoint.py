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
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["TrainState", "save_checkpoint", "restore_checkpoint", "DS_TAG"]

DS_TAG = "ds"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done in this stage
    epoch: int = 0
    world_size: int = 1
    global_batch: int = 1
    consumed: set = field(default_factory=set)  # sample ids trained on in the current epoch


def save_checkpoint(engine, state: TrainState, rank: int, metrics: dict) -> None:
    """Every rank: DeepSpeed save, own consumed ids, barrier, ray.train.report (itself a barrier)."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        (Path(tmp) / f"consumed-rank{rank}.json").write_text(json.dumps(sorted(state.consumed)))
        if rank == 0:
            meta = {k: v for k, v in asdict(state).items() if k != "consumed"}
            (Path(tmp) / "train_state.json").write_text(json.dumps(meta))
        if dist.is_initialized():
            dist.barrier()
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch},
                         checkpoint=Checkpoint.from_directory(tmp))


def restore_checkpoint(engine, checkpoint, world_size: int) -> tuple[TrainState, bool]:
    """(state, weights_only) from a Ray checkpoint; loads the engine in place."""
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
    state = TrainState(step=meta["step"], epoch=meta["epoch"], world_size=world_size,
                       global_batch=meta["global_batch"], consumed=consumed)
    return state, not same
