"""The lmms-eval adapter on the local shapes tasks (no downloads) agrees with student.eval.

lmms-eval lives in its own environment (.venv-eval, docs/evaluation.md): it pulls a torchvision
built for CUDA torch. The test runs there as a subprocess and is skipped when that environment is
not set up.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from actors.shapes.tokenizer import load_tokenizer
from student.eval import evaluate, load_split
from student.model import build_processor, build_student, export, get_preset

ROOT = Path(__file__).resolve().parents[1]
EVAL_PY = Path(os.environ.get("MOD_DISTILL_EVAL_PY", ROOT / ".venv-eval" / "bin" / "python"))

pytestmark = pytest.mark.skipif(not EVAL_PY.exists(), reason=f"no lmms-eval environment at {EVAL_PY} (docs/evaluation.md)")


def test_lmms_eval_shapes_tasks_match_student_eval(shapes_world, tmp_path):
    import torch

    tok = load_tokenizer(shapes_world / "tokenizer")
    model = build_student(get_preset("tiny"), tok, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large random weights: answers that differ per record, so agreement means something
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    processor = build_processor(tok)
    export(model, processor, tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    lm = subprocess.run([str(EVAL_PY), "-m", "student.eval.lmms_run", "--model", str(tmp_path / "ckpt"),
                         "--tasks", "shapes_vqa,shapes_pope,shapes_caption", "--shapes-world", str(shapes_world),
                         "--limit", "4", "--out", str(tmp_path / "lmms.json"),
                         "--predictions", str(tmp_path / "lmms.jsonl")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert lm.returncode == 0, lm.stdout[-3000:] + lm.stderr[-3000:]
    theirs = {x["id"]: x for x in map(json.loads, (tmp_path / "lmms.jsonl").read_text().splitlines())}
    assert len(theirs) == 12 and {x["task"] for x in theirs.values()} == {"shapes_vqa", "shapes_pope", "shapes_caption"}

    # The same records through student.eval: every answer identical, so every score identical.
    records, _ = load_split(shapes_world, "test")
    picked = [r for r in records if r["id"] in theirs]
    ours = evaluate(model.eval(), processor, picked, progress=False, return_predictions=True)
    mine = {p["id"]: p["prediction"] for p in ours["predictions"]}
    assert {k: v["prediction"] for k, v in theirs.items()} == mine
    assert len(set(mine.values())) > 1
    got = json.loads((tmp_path / "lmms.json").read_text())["results"]
    s = ours["summary"]
    assert got["shapes_vqa"]["exact_match,none"] == pytest.approx(s["vqa_accuracy"])
    assert got["shapes_pope"]["pope_f1,none"] == pytest.approx(s["pope_f1"])
    assert got["shapes_pope"]["pope_yes_ratio,none"] == pytest.approx(s["pope_yes_ratio"])
    assert got["shapes_caption"]["object_recall,none"] == pytest.approx(s["object_recall"])
    assert got["shapes_caption"]["hallucination_resp,none"] == pytest.approx(s["hallucination_resp"])
