"""Export a model as a plain Hugging Face checkpoint (safetensors + config + processor), and count parameters.

The export is what vLLM and `AutoModelForImageTextToText.from_pretrained` read: no custom code, no
DeepSpeed. `parameters.json` next to it records total vs active parameters for the model card.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["export", "parameter_report"]


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def parameter_report(model: nn.Module) -> dict:
    """Total vs active (per token) parameter counts, by component.

    Active counts top_k of num_experts routed experts in each MoE layer; everything else (attention,
    routers, Qwen2-MoE shared experts, dense FFNs, embeddings, vision tower, projector) is active.
    Tied weights are counted once.
    """
    from student.model.trainable import param_group

    named = dict(model.named_parameters())  # deduplicates tied weights
    by_group: dict[str, int] = {"vision": 0, "projector": 0, "llm": 0}
    experts = 0
    routers = 0
    for name, p in named.items():
        group = param_group(name)
        by_group["llm" if group == "ffn" else group] += p.numel()
        if ".mlp.experts." in name:
            experts += p.numel()
        elif ".mlp.gate." in name:
            routers += p.numel()
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_experts = int(getattr(text, "num_experts", 0) or 0)
    top_k = int(getattr(text, "num_experts_per_tok", 0) or 0)
    experts_active = experts // num_experts * top_k if num_experts else 0
    total = sum(by_group.values())
    moe_layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in named if ".mlp.experts." in n})
    return {
        "total": total,
        "active": total - experts + experts_active,
        "vision": by_group["vision"],
        "projector": by_group["projector"],
        "language_model": by_group["llm"],
        "experts": experts,
        "experts_active": experts_active,
        "routers": routers,
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_layers": moe_layers,
        "trainable": _numel(p for p in named.values() if p.requires_grad),
    }


def export(model, processor, out_dir: str | Path) -> Path:
    """Write `model` (safetensors) and `processor` (tokenizer, image processor, chat template) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    (out / "parameters.json").write_text(json.dumps(parameter_report(model), indent=2) + "\n")
    return out
