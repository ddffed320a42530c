"""The DeepSpeed config of a stage, from the recipe's OptimSpec and the run's flags.

fp32 on CPU (DeepSpeed's CPU accelerator has no fast bf16 path and the tiny models gain nothing),
bf16 on GPU. AdamW is DeepSpeed's own optimizer with `torch_adam: True`, so no FusedAdam JIT build
(~54 s on a CPU box) is needed. The learning rate is set per step by the worker from
`schedule.lr_at`, so the config carries no scheduler.
"""
from __future__ import annotations

from actors.recipe import OptimSpec

__all__ = ["ZERO_STAGES", "deepspeed_config"]

ZERO_STAGES = (0, 1, 2, 3)


def deepspeed_config(optim: OptimSpec, *, zero_stage: int = 2, micro_batch: int, world_size: int,
                     bf16: bool = False, grad_clip: float = 1.0) -> dict:
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage: expected one of {ZERO_STAGES}, got {zero_stage}")
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"micro_batch and world_size must be >= 1, got {micro_batch}, {world_size}")
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # progress is ours (tqdm + metrics.jsonl), not DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }
