"""Evaluate a model on shapes-world records: decode, score, and write the JSON the run report reads.

- `evaluate(model, processor, records)`: in-process, for the trainer after each stage.
- `evaluate_checkpoint(path, data_dir)`: load an HF checkpoint and its processor, then `evaluate`.
- `evaluate_stage(run_dir, stage, who)`: the run-directory convention, RUN/eval/<stage>_<who>.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from student.eval.data import load_split
from student.eval.decode import DecodeConfig, greedy_decode
from student.eval.metrics import score_predictions

__all__ = ["evaluate", "evaluate_checkpoint", "evaluate_stage", "stage_model_dir", "write_result", "WHO"]

WHO = ("teacher", "student")


def evaluate(model, processor, records: list[dict], *, decode: DecodeConfig = DecodeConfig(),
             progress: bool = True, return_predictions: bool = False) -> dict:
    """Metrics (metrics.score_predictions) of `model` on `records`, plus decoding settings and timing."""
    if not records:
        raise ValueError("evaluate: no records to evaluate")
    start = time.perf_counter()
    answers = greedy_decode(model, processor, records, decode, progress=progress)
    elapsed = time.perf_counter() - start
    items = [
        {"id": r["id"], "task": r["task"], "subtask": r.get("subtask"), "answer": r["answer"],
         "prediction": a, "objects": r.get("objects")}
        for r, a in zip(records, answers)
    ]
    result = score_predictions(items)
    result["decode"] = asdict(decode)
    result["time_s"] = elapsed
    result["records_per_s"] = len(records) / elapsed if elapsed > 0 else None
    try:
        from student.model.export import parameter_report

        rep = parameter_report(model)
        result["parameters"] = {k: rep[k] for k in ("total", "active", "num_experts", "top_k")}
    except Exception:  # a model outside our Llava layout still gets scored
        pass
    if return_predictions:
        result["predictions"] = [{k: v for k, v in it.items() if k != "objects"} for it in items]
    return result


def write_result(result: dict, out: str | Path, predictions_out: str | Path | None = None) -> Path:
    """JSON (strict: no NaN) to `out`; predictions, if present, go to a JSONL file instead of the JSON."""
    result = dict(result)
    preds = result.pop("predictions", None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    if predictions_out is not None and preds is not None:
        p = Path(predictions_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(x) + "\n" for x in preds))
    return out


def evaluate_checkpoint(model_path: str | Path, data_dir: str | Path, *, split: str = "test",
                        limit: int | None = None, decode: DecodeConfig = DecodeConfig(), progress: bool = True,
                        return_predictions: bool = False, device: str | None = None) -> dict:
    """Load the checkpoint (student.model.loading.load_model) and its processor, and evaluate it."""
    from transformers import AutoProcessor

    from student.model.loading import load_model

    records, skipped = load_split(data_dir, split, limit)
    model = load_model(model_path)
    if device:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(str(model_path), local_files_only=True)
    result = evaluate(model, processor, records, decode=decode, progress=progress,
                      return_predictions=return_predictions)
    result.update(model=str(model_path), data=str(data_dir), split=split, skipped=skipped)
    return result


def stage_model_dir(run_dir: str | Path, stage: str, who: str) -> Path:
    """RUN/teacher for the teacher (and the `teacher` stage), RUN/stages/<stage>/hf for the student."""
    if who not in WHO:
        raise ValueError(f"who must be one of {WHO}, got {who!r}")
    run_dir = Path(run_dir)
    if who == "teacher" or stage == "teacher":
        return run_dir / "teacher"
    return run_dir / "stages" / stage / "hf"


def evaluate_stage(run_dir: str | Path, stage: str, who: str, *, model_path: str | Path | None = None,
                   data_dir: str | Path | None = None, split: str = "test", limit: int | None = None,
                   decode: DecodeConfig = DecodeConfig(), progress: bool = True) -> Path:
    """Evaluate after `stage` and write RUN/eval/<stage>_<who>.json (what student.report tabulates)."""
    run_dir = Path(run_dir)
    path = Path(model_path) if model_path else stage_model_dir(run_dir, stage, who)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no HF checkpoint (config.json) to evaluate for {stage}/{who}")
    result = evaluate_checkpoint(path, data_dir or run_dir / "world", split=split, limit=limit, decode=decode,
                                 progress=progress)
    result.update(stage=stage, who=who)
    return write_result(result, run_dir / "eval" / f"{stage}_{who}.json")
