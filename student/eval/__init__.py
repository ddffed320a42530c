"""Evaluation on the shapes world: VQA, POPE and caption hallucination (Object HalBench analogues).

metrics    pure scoring functions (exact match, POPE confusion, Resp/Ment hallucination rates)
data       evaluation records from DIR/<split>/part-*.parquet
decode     batched greedy decoding with left padding and the KV cache (model.generate)
evaluate   evaluate(model, processor, records) -> dict; checkpoint and run-directory helpers
lmms       lmms-eval model `mod_distill` (extra `eval`, own venv); lmms_tasks: the world as lmms-eval
           tasks; lmms_run: `python -m student.eval.lmms_run` (docs/evaluation.md)
CLI        python -m student.eval --model PATH --data DIR
"""
from student.eval.data import EVAL_TASKS, load_split, select_records
from student.eval.decode import DecodeConfig, greedy_decode
from student.eval.evaluate import evaluate, evaluate_checkpoint, evaluate_stage, stage_model_dir, write_result
from student.eval.metrics import SUMMARY_KEYS, score_predictions

__all__ = [
    "EVAL_TASKS",
    "SUMMARY_KEYS",
    "DecodeConfig",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_stage",
    "greedy_decode",
    "load_split",
    "score_predictions",
    "select_records",
    "stage_model_dir",
    "write_result",
]
