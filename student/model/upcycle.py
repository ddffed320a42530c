"""Sparse upcycling (Komatsuzaki et al. 2022; LLaVA-MoD Sec. 3.1, Eq. 2-4): dense Qwen FFNs -> N experts + router.

Qwen3 -> Qwen3-MoE and Qwen2 -> Qwen2-MoE, inside a Llava model, producing a stock HF model whose
`text_config` is the MoE config (so `from_pretrained` and vLLM load it with the same layer pattern).

Why it is exact at init: every expert is a copy of the dense FFN and the router renormalises its top-k
probabilities (`norm_topk_prob=True`), so each token's output is sum_k w_k * FFN(x) = FFN(x) whatever
the routing. Qwen2-MoE adds an always-on shared expert behind a sigmoid gate; its down projection is
zeroed so it contributes exactly 0 until trained. (Qwen2 -> Qwen3-MoE would not be exact: q/k norms.)

Router: W_r ~ N(0, router_std^2), seeded. Because the weights sum to 1 and the experts are identical,
the task loss gives the router exactly zero gradient at init: it learns only from the load-balancing
and z losses until the experts diverge (which they do once their different tokens update them).
`expert_noise` (default 0, seeded) perturbs each expert by N(0, (expert_noise * std(W))^2) to break
that symmetry from step one, at the price of exactness.

Layer pattern: "all", or "every_other" = layers 0, 2, 4, ... (the MoE-LLaVA/LLaVA-MoD code's "sparse"
mode), or explicit indices. It is written to the config as `mlp_only_layers` (with
`decoder_sparse_step=1`) because both Qwen MoE families and vLLM honour that list verbatim, whereas
`decoder_sparse_step=2` would put the experts on the odd layers.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import LlavaForConditionalGeneration, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

__all__ = ["upcycle", "moe_layer_indices", "moe_text_config", "is_moe"]

LayerPattern = Literal["all", "every_other"] | Sequence[int]
_MOE_CONFIG = {"qwen3": Qwen3MoeConfig, "qwen2": Qwen2MoeConfig}
_NOT_COPIED = {"transformers_version", "architectures", "model_type", "_name_or_path"}


def is_moe(model_or_config) -> bool:
    cfg = getattr(model_or_config, "config", model_or_config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return text.model_type in ("qwen3_moe", "qwen2_moe")


def moe_layer_indices(num_layers: int, layers: LayerPattern) -> list[int]:
    if layers == "all":
        return list(range(num_layers))
    if layers == "every_other":
        return list(range(0, num_layers, 2))
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all', 'every_other' or a list of indices, got {layers!r}")
    idx = sorted(set(int(i) for i in layers))
    if not idx or idx[0] < 0 or idx[-1] >= num_layers:
        raise ValueError(f"layer indices must be a non-empty subset of 0..{num_layers - 1}, got {list(layers)}")
    return idx


def moe_text_config(
    dense: PretrainedConfig,
    num_experts: int,
    top_k: int,
    moe_layers: Sequence[int],
    *,
    shared_expert_intermediate_size: int | None = None,
    router_aux_loss_coef: float = 0.01,
) -> PretrainedConfig:
    """The MoE twin of a dense Qwen3/Qwen2 text config: same dims, experts the size of the dense FFN."""
    family = dense.model_type
    if family not in _MOE_CONFIG:
        raise ValueError(f"upcycle supports Qwen3 and Qwen2 text models, got model_type {family!r}")
    moe_cls = _MOE_CONFIG[family]
    known = set(moe_cls().to_dict()) | {"head_dim"}
    kw = {k: v for k, v in dense.to_dict().items() if k in known and k not in _NOT_COPIED}
    n = dense.num_hidden_layers
    kw.update(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=dense.intermediate_size,
        norm_topk_prob=True,  # required for exactness (weights of identical experts must sum to 1)
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(n) if i not in set(moe_layers)],
        output_router_logits=False,  # Llava drops them anyway; RouterRecorder collects them with hooks
        router_aux_loss_coef=router_aux_loss_coef,  # LLaVA-MoD: 0.01; informational (Llava ignores it)
    )
    if family == "qwen2":
        kw["shared_expert_intermediate_size"] = shared_expert_intermediate_size or dense.intermediate_size
        kw["qkv_bias"] = True  # dense Qwen2 always has q/k/v biases
    cfg = moe_cls(**kw)
    cfg._attn_implementation = dense._attn_implementation
    return cfg


def _language_model_prefix(model: torch.nn.Module) -> str:
    lm = model.model.language_model
    return next(name for name, mod in model.named_modules() if mod is lm) + "."


@torch.no_grad()
def upcycle(
    model: LlavaForConditionalGeneration,
    num_experts: int = 4,
    top_k: int = 2,
    *,
    layers: LayerPattern = "every_other",
    router_std: float | None = None,
    expert_noise: float = 0.0,
    seed: int = 0,
    shared_expert_intermediate_size: int | None = None,
    router_aux_loss_coef: float = 0.01,
    experts_implementation: str = "grouped_mm",
) -> LlavaForConditionalGeneration:
    """Return a new Llava model whose LLM FFNs (on `layers`) are `num_experts` copies behind a top-`top_k` router.

    The input model is left untouched. router_std defaults to the text config's initializer_range.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"upcycle expects a LlavaForConditionalGeneration, got {type(model).__name__}")
    if is_moe(model):
        raise ValueError("upcycle: the model is already a mixture of experts")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if expert_noise < 0:
        raise ValueError(f"expert_noise must be >= 0, got {expert_noise}")

    dense_cfg = model.config.text_config
    moe_layers = moe_layer_indices(dense_cfg.num_hidden_layers, layers)
    moe_cfg = moe_text_config(
        dense_cfg,
        num_experts,
        top_k,
        moe_layers,
        shared_expert_intermediate_size=shared_expert_intermediate_size,
        router_aux_loss_coef=router_aux_loss_coef,
    )
    cfg = copy.deepcopy(model.config)
    cfg.text_config = moe_cfg

    ref = next(model.parameters())
    from transformers.initialization import no_init_weights  # every tensor is overwritten below

    with no_init_weights():
        moe = LlavaForConditionalGeneration(cfg)
    moe = moe.to(device=ref.device, dtype=ref.dtype)
    moe.set_experts_implementation({"text_config": experts_implementation})

    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = dense_cfg.initializer_range if router_std is None else router_std

    def randn(shape, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=ref.device, dtype=ref.dtype)

    dense_sd = model.state_dict()
    prefix = _language_model_prefix(moe)
    new_sd = {}
    for key, target in moe.state_dict().items():
        if key in dense_sd:
            new_sd[key] = dense_sd[key]
    for i in moe_layers:
        src = f"{prefix}layers.{i}.mlp."
        gate, up, down = (dense_sd[f"{src}{p}_proj.weight"] for p in ("gate", "up", "down"))
        gate_up = torch.cat([gate, up], dim=0)  # fused layout: gate rows first, then up
        e_gate_up = gate_up.expand(num_experts, *gate_up.shape).clone()
        e_down = down.expand(num_experts, *down.shape).clone()
        if expert_noise > 0:
            e_gate_up += randn(e_gate_up.shape, expert_noise * gate_up.float().std().item())
            e_down += randn(e_down.shape, expert_noise * down.float().std().item())
        new_sd[f"{src}experts.gate_up_proj"] = e_gate_up
        new_sd[f"{src}experts.down_proj"] = e_down
        new_sd[f"{src}gate.weight"] = randn((num_experts, moe_cfg.hidden_size), std)
        if moe_cfg.model_type == "qwen2_moe":
            s = moe_cfg.shared_expert_intermediate_size
            h = moe_cfg.hidden_size
            init = moe_cfg.initializer_range
            new_sd[f"{src}shared_expert.gate_proj.weight"] = randn((s, h), init)
            new_sd[f"{src}shared_expert.up_proj.weight"] = randn((s, h), init)
            new_sd[f"{src}shared_expert.down_proj.weight"] = torch.zeros(h, s, device=ref.device, dtype=ref.dtype)
            new_sd[f"{src}shared_expert_gate.weight"] = randn((1, h), init)
    missing = set(moe.state_dict()) - set(new_sd)
    if missing:
        raise RuntimeError(f"upcycle: no source for {sorted(missing)[:5]} (unexpected model layout)")
    moe.load_state_dict(new_sd, strict=True)
    moe.tie_weights()  # no-op unless the config ties lm_head to the embeddings
    moe.train(model.training)
    return moe
