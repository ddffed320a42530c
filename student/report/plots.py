"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from student.report.load import router_keys

__all__ = ["plot_stage_losses", "plot_total_loss", "plot_expert_load", "loss_keys"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_keys(records: list[dict]) -> list[str]:
    """loss/* and dpo/* keys with at least one number, loss/total first."""
    keys = sorted({k for r in records for k, v in r.items()
                   if k.startswith(("loss/", "dpo/")) and isinstance(v, (int, float))})
    return sorted(keys, key=lambda k: (k != "loss/total", k))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_stage_losses(stage: str, records: list[dict], out: Path) -> Path | None:
    """Every loss term of one stage against its step; DPO margin/accuracy on their own axis."""
    keys = loss_keys(records)
    if not keys:
        return None
    plt = _plt()
    losses = [k for k in keys if k.startswith("loss/")]
    dpo = [k for k in keys if k.startswith("dpo/")]
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(11 if dpo else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    for k in losses:
        x, y = _series(records, k)
        ax.plot(x, y, label=k.removeprefix("loss/"), linewidth=2.0 if k == "loss/total" else 1.2)
    ax.set(title=f"{stage}: losses", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if dpo:
        ax2 = axes[0][1]
        for k in dpo:
            x, y = _series(records, k)
            ax2.plot(x, y, label=k)
        ax2.set(title=f"{stage}: preference", xlabel="step")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_total_loss(stages: list[str], by_stage: dict[str, list[dict]], out: Path) -> Path | None:
    """loss/total of all stages on one axis, stage after stage, with the boundaries marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    offset = 0
    drawn = False
    for stage in stages:
        x, y = _series(by_stage[stage], "loss/total")
        if not x:
            continue
        start = min(x)
        ax.plot([offset + s - start for s in x], y, label=stage)
        ax.axvline(offset, color="grey", alpha=0.3, linewidth=0.8)
        offset += max(x) - start + 1
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="total loss per stage", xlabel="step (stages in order)", ylabel="loss/total")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_expert_load(stage: str, records: list[dict], out: Path) -> Path | None:
    """One panel per MoE layer: each expert's token fraction against the step; dashed: an even split."""
    layers = router_keys(records)
    if not layers:
        return None
    plt = _plt()
    n = len(layers)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for i, (layer, experts) in enumerate(layers.items()):
        ax = axes[i // cols][i % cols]
        totals: dict[int, float] = {}
        for e, key in experts:
            x, y = _series(records, key)
            ax.plot(x, y, label=f"expert {e}", linewidth=1.2)
            for s, v in zip(x, y):
                totals[s] = totals.get(s, 0.0) + v
        if totals:
            even = sum(totals.values()) / len(totals) / len(experts)
            ax.axhline(even, color="black", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="token fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(f"{stage}: expert load per layer")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
