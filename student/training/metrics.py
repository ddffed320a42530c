"""Per-step metrics: RUN/metrics.jsonl, TensorBoard event files under RUN/tb/<stage>, a tqdm bar with
ETA, and the end-of-stage summary. Only rank 0 writes; the values it writes are already averaged over
ranks by the worker loop.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["MetricsLogger", "summarize", "format_summary"]


class MetricsLogger:
    def __init__(self, run_dir: Path, stage: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.stage = stage
        self.records: list[dict] = []
        self.t0 = time.time()
        self._tb = self._bar = self._file = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb" / stage), flush_secs=10)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage}", unit="step",
                             mininterval=2.0, dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"stage": self.stage, "step": step, **values}
        self.records.append(rec)
        self._file.write(json.dumps(rec, sort_keys=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{values.get('loss/total', float('nan')):.4f}",
                                  wait=f"{values.get('teacher_wait_s', 0.0):.2f}s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(records: list[dict], wall_s: float) -> dict:
    """Stage summary from its per-step records: first/last-10% mean of each loss term, throughput, waits."""
    if not records:
        return {"steps": 0, "wall_s": wall_s}
    n = max(1, len(records) // 10)
    keys = sorted({k for r in records for k in r if k.startswith(("loss/", "dpo/"))})
    out = {
        "steps": len(records),
        "last_step": records[-1]["step"],
        "wall_s": wall_s,
        "step_time_s": _mean([r.get("time_s") for r in records[1:]] or [records[0].get("time_s")]),
        "first_step_time_s": records[0].get("time_s"),
        "tokens_per_s": _mean([r.get("tokens_per_s") for r in records[1:]] or [records[0].get("tokens_per_s")]),
        "teacher_wait_s": sum(r.get("teacher_wait_s", 0.0) for r in records),
        "terms": {k: {"first": _mean([r.get(k) for r in records[:n]]), "last": _mean([r.get(k) for r in records[-n:]])}
                  for k in keys},
    }
    return out


def format_summary(stage: str, s: dict) -> str:
    """A plain-text table for the end of a stage."""
    if not s.get("steps"):
        return f"stage {stage}: no steps run"
    lines = [
        f"stage {stage}: {s['steps']} steps (last step {s['last_step']}) in {s['wall_s']:.1f}s; "
        f"step {s['step_time_s'] * 1000:.0f} ms (first {s['first_step_time_s'] * 1000:.0f} ms), "
        f"{s['tokens_per_s']:.0f} tokens/s, waiting on data/teacher {s['teacher_wait_s']:.1f}s"
        + (f"; worker set-up {s['setup_s']:.1f}s" if "setup_s" in s else "")
        + (f"; fit {s['fit_s']:.1f}s" if "fit_s" in s else ""),
        f"  {'metric':<22}{'first 10%':>12}{'last 10%':>12}",
    ]
    for k, v in s["terms"].items():
        lines.append(f"  {k:<22}{v['first']:>12.4f}{v['last']:>12.4f}")
    return "\n".join(lines)
