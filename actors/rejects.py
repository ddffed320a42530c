"""Per-row rejects and the pass ledger: nothing is dropped silently.

A raising UDF fails a Ray Data pipeline (or drops whole blocks), so every stage catches errors per
row (`RowReject`), keeps the good rows and reports the bad ones, with their id and reason, to one
`DataLedger` actor per stage run. At the end of every pass the ledger checks that
rows_in == rows_out + rows_rejected (per operator, between operators, and overall), writes
RUN/stages/<stage>/rejects.parquet and data_stats.json, and refuses a pass whose reject rate is
above the threshold (default 1%). The same check runs during a pass once enough rows were seen, so
a broken source stops the run early with the reasons counted.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

__all__ = [
    "REASONS",
    "RowReject",
    "RejectRateExceeded",
    "DataBalanceError",
    "reject",
    "balance_problems",
    "rate_message",
    "DataLedger",
    "close_pass",
    "REJECTS_SCHEMA",
]

REASONS = {
    "missing_image": "the image file does not exist",
    "undecodable_image": "the image bytes do not decode",
    "no_image": "the row has no image (text-only rows are not supported)",
    "empty_conversation": "no turns",
    "bad_role": "a turn's role is not system / user / assistant",
    "no_response": "no assistant turn with content",
    "image_token_count": "the text's image placeholders do not match the row's images",
    "too_long": "over max_length after truncation, or truncation would cut image tokens",
    "bad_preference": "a preference row lacks its prompt, chosen or rejected response",
    "malformed_record": "the source record could not be read (file, line and parse error in detail)",
    "teacher_rejected": "the teacher refused the request (field and reason in detail)",
    "unexpected_error": "an error no rule anticipated (type and message in detail)",
}

REJECTS_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("stage", pa.string()), ("op", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("pass", pa.int32()),
])


class RowReject(Exception):
    """A row that cannot be used; `reason` is a key of REASONS, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class RejectRateExceeded(RuntimeError):
    """Too many rows were rejected: the data is broken, not just noisy."""


class DataBalanceError(RuntimeError):
    """rows_in != rows_out + rows_rejected: rows were lost or invented somewhere."""


def reject(row_id: str, source: str | None, err: BaseException) -> dict:
    """A reject record for one row from the exception its processing raised."""
    if isinstance(err, RowReject):
        reason, detail = err.reason, err.detail
    else:
        reason, detail = "unexpected_error", f"{type(err).__name__}: {err}"
    return {"id": str(row_id), "source": "" if source is None else str(source), "reason": reason, "detail": detail[:2000]}


def balance_problems(ops: list[str], counts: dict[str, dict], expected_rows: int | None, complete: bool = True) -> list[str]:
    """What does not add up in one pass. counts: op -> {"in", "out", "rejected"}.

    complete=False (a pass stopped early, e.g. at max_steps): rows may still be between operators,
    so only each operator's own balance is checked.
    """
    problems = []
    for op in ops:
        c = counts.get(op, {"in": 0, "out": 0, "rejected": 0})
        if c["in"] != c["out"] + c["rejected"]:
            problems.append(f"{op}: rows_in {c['in']} != rows_out {c['out']} + rows_rejected {c['rejected']}")
    if not complete:
        return problems
    for a, b in zip(ops, ops[1:]):
        ca, cb = counts.get(a, {"out": 0}), counts.get(b, {"in": 0})
        if ca["out"] != cb["in"]:
            problems.append(f"{a} emitted {ca['out']} rows but {b} received {cb['in']}")
    first = counts.get(ops[0], {"in": 0})["in"]
    last = counts.get(ops[-1], {"out": 0})["out"]
    rejected = sum(counts.get(op, {"rejected": 0})["rejected"] for op in ops)
    if first != last + rejected:
        problems.append(f"overall: rows_in {first} != rows_out {last} + rows_rejected {rejected}")
    if expected_rows is not None and first != expected_rows:
        problems.append(f"the sources planned {expected_rows} rows but {ops[0]} received {first}")
    return problems


def rate_message(stage: str, rows_in: int, rejected: int, reasons: Counter, threshold: float, rejects_path) -> str | None:
    """The stop message when rejected / rows_in > threshold, else None."""
    if rows_in == 0 or rejected / rows_in <= threshold:
        return None
    top = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(5))
    return (f"stage {stage!r}: {rejected} of {rows_in} rows rejected ({rejected / rows_in:.1%}), above the "
            f"threshold of {threshold:.1%}; reasons: {top}. See {rejects_path} for every row; fix the data or "
            f"raise the threshold (max_reject_rate).")


@ray.remote(num_cpus=0)
class DataLedger:
    """Counts rows in/out/rejected per operator for one stage run, and keeps the rejected rows."""

    def __init__(self, stage: str, out_dir: str, ops: list[str], max_reject_rate: float = 0.01,
                 min_rows_to_judge: int = 200, expected_rows: int | None = None):
        self.stage, self.ops = stage, list(ops)
        self.out_dir = Path(out_dir)
        self.max_reject_rate = float(max_reject_rate)
        self.min_rows_to_judge = int(min_rows_to_judge)
        self.expected_rows = expected_rows
        self.pass_index = 0
        self._new_pass()
        self.rejects: list[dict] = []  # every pass; deduplicated by (id, reason) when written
        self.history: list[dict] = []
        self.extra: dict = {}

    def _new_pass(self) -> None:
        self.counts = {op: {"in": 0, "out": 0, "rejected": 0} for op in self.ops}
        self.reasons: Counter = Counter()
        self.pass_rejects: list[dict] = []
        self.pass_extra: Counter = Counter()
        self.t0 = time.time()

    @property
    def rejects_path(self) -> Path:
        return self.out_dir / "rejects.parquet"

    def record(self, op: str, rows_in: int, rows_out: int, rejects: list[dict], extra: dict | None = None) -> str | None:
        """Add one batch's counts; returns a stop message once the reject rate is over the threshold."""
        if op not in self.counts:
            raise ValueError(f"unknown operator {op!r}; this ledger counts {self.ops}")
        c = self.counts[op]
        c["in"] += int(rows_in)
        c["out"] += int(rows_out)
        c["rejected"] += len(rejects)
        for r in rejects:
            self.reasons[r["reason"]] += 1
            self.pass_rejects.append({**r, "stage": self.stage, "op": op, "pass": self.pass_index})
        for k, v in (extra or {}).items():
            self.pass_extra[k] += v
        rows = self.counts[self.ops[0]]["in"]
        if rows < self.min_rows_to_judge:
            return None
        if rate_message(self.stage, rows, len(self.pass_rejects), self.reasons, self.max_reject_rate, self.rejects_path):
            self._write()  # so the file the message points at exists
        return rate_message(self.stage, rows, len(self.pass_rejects), self.reasons, self.max_reject_rate, self.rejects_path)

    def _write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seen, rows = set(), []
        for r in self.rejects + self.pass_rejects:
            key = (r["id"], r["reason"])
            if key not in seen:
                seen.add(key)
                rows.append({k: r.get(k) for k in REJECTS_SCHEMA.names})
        tmp = self.rejects_path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), tmp)
        tmp.replace(self.rejects_path)
        stats = {"stage": self.stage, "ops": self.ops, "max_reject_rate": self.max_reject_rate,
                 "passes": self.history, "current": self._summary(), **self.extra}
        (self.out_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))

    def _summary(self) -> dict:
        rows_in = self.counts[self.ops[0]]["in"]
        rejected = sum(c["rejected"] for c in self.counts.values())
        return {
            "pass": self.pass_index,
            "rows_in": rows_in,
            "rows_out": self.counts[self.ops[-1]]["out"],
            "rows_rejected": rejected,
            "reject_rate": rejected / rows_in if rows_in else 0.0,
            "reasons": dict(self.reasons),
            "ops": {k: dict(v) for k, v in self.counts.items()},
            "seconds": round(time.time() - self.t0, 3),
            **dict(self.pass_extra),
        }

    def set_info(self, **info) -> None:
        """Static facts written into data_stats.json (sources, rates, annotation plan, cache)."""
        self.extra.update(info)

    def close_pass(self, complete: bool = True) -> dict:
        """End the current pass: check the balance and the rate, write the files, start a new pass.

        Returns the pass summary with "problems" (balance) and "stop" (rate message or None); the
        caller raises (see `close_pass` below), so the error surfaces in the caller's process.
        """
        summary = self._summary()
        summary["complete"] = bool(complete)
        summary["problems"] = balance_problems(self.ops, self.counts, self.expected_rows, complete)
        summary["stop"] = rate_message(self.stage, summary["rows_in"], summary["rows_rejected"], self.reasons,
                                       self.max_reject_rate, self.rejects_path)
        self.history.append(summary)
        self._write()
        self.rejects.extend(self.pass_rejects)
        self.pass_index += 1
        self._new_pass()
        return summary

    def passes(self) -> list[dict]:
        return list(self.history)


def close_pass(ledger, complete: bool = True) -> dict:
    """Close the ledger's current pass; raise DataBalanceError / RejectRateExceeded with the reasons."""
    summary = ray.get(ledger.close_pass.remote(complete))
    if summary["problems"]:
        raise DataBalanceError(f"pass {summary['pass']}: " + "; ".join(summary["problems"]))
    if summary["stop"]:
        raise RejectRateExceeded(summary["stop"])
    return summary
