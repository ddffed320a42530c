"""Feeding Ray Train: the worker side of the data plane.

The driver builds the stage's data (`actors.pipeline.build_stage_data`) and passes
`stage_data.trainer_datasets()` (= {"train": ds}) to the TorchTrainer; Ray Train splits it into one
streaming shard per worker. Inside the train loop, `train_batches` iterates this worker's shard one
pass at a time as padded torch batches (`actors.collate.pad_collate`: padding per batch, not to a
global maximum) and, when the pass is over, closes it on the stage's ledger (rank 0 only), which
checks rows_in == rows_out + rows_rejected and the reject rate.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

from actors.collate import pad_collate

__all__ = ["train_batches", "collate_fn"]


def collate_fn(pad_id: int):
    """The collate a TorchTrainer worker hands to `iter_torch_batches`."""
    return partial(pad_collate, pad_id=pad_id)


def train_batches(
    batch_size: int,
    pad_id: int,
    *,
    dataset_name: str = "train",
    ledger=None,
    prefetch_batches: int = 2,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict]:
    """One pass over this worker's shard as padded torch batches (call it once per epoch).

    ledger: the stage's DataLedger handle (`StageData.ledger`); rank 0 closes the pass on it once its
    shard is exhausted (shards of a streaming split end together, when the pass's stream ends), and
    a DataBalanceError / RejectRateExceeded raised there stops training with the reasons.
    """
    import ray.train

    shard = ray.train.get_dataset_shard(dataset_name)
    yield from shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate_fn(pad_id), prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=local_shuffle_buffer_size, local_shuffle_seed=local_shuffle_seed, drop_last=drop_last,
    )
    if ledger is not None and ray.train.get_context().get_world_rank() == 0:
        from actors.rejects import close_pass

        close_pass(ledger)
