"""Which samples each optimizer step trained on, per rank: RUN/stages/<stage>/samples/rank{r}.jsonl.

Why: "every sample once per epoch, across worker restarts and teacher failures" is a claim that has
to be counted, not assumed. Each rank appends one line per step, flushed as it goes:
    {"attempt": A, "start_step": S, "step": s, "epoch": e, "rank": r, "ids": [...]}
`attempt` is one id per start of the worker group (rank 0's clock, broadcast; later starts have
larger ids) and `start_step` the step it resumed from (0 for a fresh start). A restarted attempt
redoes the steps after its checkpoint, so an earlier attempt's lines for steps > its start_step are
superseded (whatever the world size was). `effective_steps` applies that rule and `sample_counts`
counts each id per epoch. A line torn by a crash mid-write is skipped and counted.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

__all__ = ["SampleLog", "samples_dir", "read_lines", "effective_steps", "sample_counts", "sample_summary"]


def samples_dir(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / "samples"


class SampleLog:
    """One rank's append-only log of the ids it trained on, a line per step."""

    def __init__(self, stage_dir: str | Path, rank: int, attempt: int, start_step: int):
        self.head = {"attempt": int(attempt), "start_step": int(start_step)}
        self.rank = int(rank)
        path = samples_dir(stage_dir) / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def write(self, step: int, epoch: int, ids) -> None:
        rec = {**self.head, "step": int(step), "epoch": int(epoch), "rank": self.rank, "ids": [str(i) for i in ids]}
        self._file.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._file.close()


def read_lines(stage_dir: str | Path) -> tuple[list[dict], int]:
    """(every well-formed line of every rank's log, lines torn by a crash and skipped)."""
    lines, torn = [], 0
    for f in sorted(samples_dir(stage_dir).glob("rank*.jsonl")):
        for text in f.read_text().splitlines():
            if not text.strip():
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                torn += 1
    return lines, torn


def effective_steps(lines: list[dict]) -> list[dict]:
    """The lines that stand: attempts in order, each superseding earlier lines of steps after its
    start_step. Sorted by (step, rank)."""
    by_attempt: dict[int, list[dict]] = {}
    for rec in lines:
        by_attempt.setdefault(rec["attempt"], []).append(rec)
    kept: list[dict] = []
    for attempt in sorted(by_attempt):
        recs = by_attempt[attempt]
        start = min(r["start_step"] for r in recs)
        kept = [r for r in kept if r["step"] <= start] + recs
    return sorted(kept, key=lambda r: (r["step"], r["rank"]))


def sample_counts(records: list[dict]) -> dict[int, Counter]:
    """{epoch: Counter(id -> times trained on)} over effective records."""
    out: dict[int, Counter] = {}
    for r in records:
        out.setdefault(r["epoch"], Counter()).update(r["ids"])
    return out


def sample_summary(stage_dir: str | Path) -> dict:
    """What summary.json reports: rows trained on, distinct ids, ids seen more than once within an
    epoch (0 when every sample is used at most once per epoch), attempts, torn lines."""
    lines, torn = read_lines(stage_dir)
    records = effective_steps(lines)
    counts = sample_counts(records)
    return {
        "rows": sum(len(r["ids"]) for r in records),
        "distinct": len({i for c in counts.values() for i in c}),
        "repeated_in_epoch": sum(1 for c in counts.values() for n in c.values() if n > 1),
        "epochs": len(counts),
        "attempts": len({r["attempt"] for r in lines}),
        "torn_lines": torn,
    }
