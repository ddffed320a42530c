"""Router observability for MoE students whose Llava wrapper drops router logits.

`RouterRecorder` puts forward hooks on the top-k router modules and keeps, per MoE layer, the router
logits of the latest forward (a later forward, e.g. a gradient-checkpoint recompute or the next decode
step, overwrites them). `stats()` turns them into per-layer expert load, entropy, load-balancing loss
and z-loss, plus the pooled losses that training adds to its objective. The two loss formulas come
from `student.losses.moe_aux` so training, logging and tests share one definition; the pooled aux loss
equals transformers' `load_balancing_loss_func`, i.e. what Qwen-MoE itself would compute.

    with RouterRecorder(model) as routers:
        out = model(**batch)
        rs = routers.stats(token_mask=batch["attention_mask"])
        loss = ce + 0.01 * rs.aux_loss        # keeps its graph: the routers get a gradient
        log.update(rs.to_log())
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["RouterRecorder", "RouterStats", "LayerRouterStats", "find_routers"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _is_router(module: nn.Module) -> bool:
    # Qwen3MoeTopKRouter / Qwen2MoeTopKRouter and look-alikes: output[0] is [tokens, E] logits.
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k") and hasattr(module, "num_experts")


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: router module}, in layer order."""
    found = {}
    for name, mod in model.named_modules():
        if _is_router(mod):
            m = _LAYER_RE.search(name)
            if m is None:
                raise ValueError(f"router {name!r} is not under a numbered decoder layer")
            found[int(m.group(1))] = mod
    return dict(sorted(found.items()))


@dataclass
class LayerRouterStats:
    layer: int
    expert_fraction: Tensor  # [E], share of top-k assignments per expert, sums to 1 (detached)
    entropy: float  # mean per-token entropy of the router softmax, nats (max log E)
    aux_loss: Tensor  # this layer's load-balancing loss (keeps graph)
    z_loss: Tensor  # this layer's router z-loss (keeps graph)


@dataclass
class RouterStats:
    layers: list[LayerRouterStats]
    aux_loss: Tensor  # pooled over MoE layers, = transformers' load_balancing_loss_func (keeps graph)
    z_loss: Tensor  # mean over MoE layers and tokens (keeps graph)
    num_experts: int
    top_k: int

    def to_log(self, prefix: str = "router") -> dict[str, float]:
        """Flat scalars for a metrics logger."""
        out = {f"{prefix}/aux_loss": self.aux_loss.item(), f"{prefix}/z_loss": self.z_loss.item()}
        for s in self.layers:
            p = f"{prefix}/layer{s.layer}"
            out[f"{p}/entropy"] = s.entropy
            out[f"{p}/aux_loss"] = s.aux_loss.item()
            out[f"{p}/z_loss"] = s.z_loss.item()
            # max/uniform load: 1.0 is perfect balance, E means one expert takes every token
            out[f"{p}/max_load"] = float(s.expert_fraction.max()) * self.num_experts
            for e, f in enumerate(s.expert_fraction.tolist()):
                out[f"{p}/expert{e}"] = f
        return out


class RouterRecorder:
    """Collect router logits per MoE layer with forward hooks; use as a context manager or attach()/detach()."""

    def __init__(self, model: nn.Module):
        self.routers = find_routers(model)
        self.logits: dict[int, Tensor] = {}
        self._handles: list = []
        if self.routers:
            tops = {(r.num_experts, r.top_k) for r in self.routers.values()}
            if len(tops) != 1:
                raise ValueError(f"routers disagree on (num_experts, top_k): {sorted(tops)}")
            (self.num_experts, self.top_k) = next(iter(tops))
        else:
            self.num_experts = self.top_k = 0

    @property
    def has_routers(self) -> bool:
        return bool(self.routers)

    def attach(self) -> "RouterRecorder":
        if not self._handles:
            for layer, router in self.routers.items():
                self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.logits.clear()

    def __enter__(self) -> "RouterRecorder":
        self.reset()
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            self.logits[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    def stats(self, token_mask: Tensor | None = None) -> RouterStats:
        """Statistics of the latest forward. token_mask: [B, S] (attention mask) or [tokens]; 0/False rows ignored."""
        from student.losses.moe_aux import expert_load, load_balancing_loss, router_z_loss

        if not self.routers:
            raise RuntimeError("RouterRecorder: the model has no MoE routers (dense model?)")
        missing = sorted(set(self.routers) - set(self.logits))
        if missing:
            raise RuntimeError(f"RouterRecorder: no router logits for layers {missing}; run a forward inside the recorder")
        layers = list(self.routers)
        logits = [self.logits[i] for i in layers]
        mask = None if token_mask is None else token_mask.reshape(-1).bool().to(logits[0].device)
        E, k = self.num_experts, self.top_k

        per_layer = []
        for i, lg in zip(layers, logits):
            with torch.no_grad():
                logp = lg.float().log_softmax(-1)
                ent = -(logp.exp() * logp).sum(-1)
                ent = ent[mask].mean() if mask is not None else ent.mean()
                frac = expert_load([lg], E, k, mask)
            per_layer.append(
                LayerRouterStats(
                    layer=i,
                    expert_fraction=frac,
                    entropy=float(ent) if not math.isnan(float(ent)) else 0.0,
                    aux_loss=load_balancing_loss([lg], E, k, mask),
                    z_loss=router_z_loss([lg], mask),
                )
            )
        return RouterStats(
            layers=per_layer,
            aux_loss=load_balancing_loss(logits, E, k, mask),
            z_loss=router_z_loss(logits, mask),
            num_experts=E,
            top_k=k,
        )
