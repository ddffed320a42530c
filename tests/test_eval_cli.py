"""The eval CLI and API end to end on a tiny random model and the generated shapes world.

Scores of a random model are ~0; these tests check structure, counts and decoding correctness.
"""
import json

import pytest
import torch
from click.testing import CliRunner

from actors.shapes.tokenizer import load_tokenizer
from student.eval import DecodeConfig, evaluate, evaluate_stage, greedy_decode, load_split
from student.eval.__main__ import main
from student.model import build_processor, build_student, export, get_preset, upcycle


def _noisy_moe_student(tok):
    """An E4T2 student with large random weights, so its greedy output depends on image and prompt."""
    model = upcycle(build_student(get_preset("tiny"), tok, seed=0), 4, 2, layers="every_other", router_std=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(shapes_world, tmp_path_factory):
    tok = load_tokenizer(shapes_world / "tokenizer")
    out = tmp_path_factory.mktemp("ckpt")
    export(_noisy_moe_student(tok), build_processor(tok), out)
    return out


def test_batched_left_padded_decoding_matches_one_at_a_time(shapes_world, checkpoint):
    from transformers import AutoProcessor

    from student.model import load_model

    model, proc = load_model(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)
    records, _ = load_split(shapes_world, "test")
    picked = [r for r in records if r["task"] == "vqa"][:5] + [r for r in records if r["task"] == "pope"][:1]
    assert len({len(r["messages"][0]["content"]) for r in picked}) > 1  # prompts of different lengths: real padding
    cfg = DecodeConfig(batch_size=8, short_max_new_tokens=6)
    batched = greedy_decode(model, proc, picked, cfg, progress=False)
    single = [greedy_decode(model, proc, [r], cfg, progress=False)[0] for r in picked]
    assert batched == single
    assert len(set(batched)) > 1  # the noisy model answers differently per record: the check has teeth
    assert proc.tokenizer.padding_side == "right"  # restored after decoding


def test_cli_writes_valid_json_with_counts(shapes_world, checkpoint, tmp_path):
    manifest = json.loads((shapes_world / "manifest.json").read_text())
    tasks = manifest["splits"]["test"]["tasks"]
    out, preds = tmp_path / "eval.json", tmp_path / "preds.jsonl"
    res = CliRunner().invoke(main, ["--model", str(checkpoint), "--data", str(shapes_world), "--batch-size", "16",
                                    "--max-new-tokens", "12", "--out", str(out), "--predictions", str(preds),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())  # strict JSON: json.loads would accept NaN, so check the text too
    assert "NaN" not in out.read_text()
    assert result["counts"] == {t: tasks[t] for t in ("caption", "pope", "vqa")}
    assert result["skipped"] == {"task:preference": tasks["preference"]}
    assert set(result["vqa"]) == {"overall", "colour", "shape", "count", "position", "size"}
    assert set(result["pope"]) >= {"overall"} and set(result["pope"]) - {"overall"} <= {"random", "popular", "adversarial"}
    assert result["vqa"]["overall"]["n"] == tasks["vqa"]
    assert result["pope"]["overall"]["n"] == tasks["pope"]
    assert result["caption"]["n"] == tasks["caption"]
    for k in ("vqa_accuracy", "pope_f1", "hallucination_resp", "object_recall"):
        assert k in result["summary"]
    assert result["decode"]["max_new_tokens"] == 12 and result["split"] == "test"
    assert result["parameters"]["num_experts"] == 4 and result["parameters"]["active"] < result["parameters"]["total"]
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == sum(result["counts"].values())
    assert {"id", "task", "subtask", "answer", "prediction"} <= set(lines[0])


def test_limit_and_stage_convention(shapes_world, checkpoint, tmp_path):
    run = tmp_path / "run"
    (run / "stages" / "d2s").mkdir(parents=True)
    (run / "stages" / "d2s" / "hf").symlink_to(checkpoint, target_is_directory=True)
    path = evaluate_stage(run, "d2s", "student", data_dir=shapes_world, limit=9,
                          decode=DecodeConfig(max_new_tokens=8, short_max_new_tokens=2), progress=False)
    assert path == run / "eval" / "d2s_student.json"
    result = json.loads(path.read_text())
    assert sum(result["counts"].values()) == 9 and result["skipped"]["over_limit"] > 0
    assert (result["stage"], result["who"]) == ("d2s", "student")
    with pytest.raises(FileNotFoundError, match="teacher"):
        evaluate_stage(run, "d2s", "teacher", data_dir=shapes_world)


def test_bad_image_names_the_record(shapes_world, checkpoint):
    from transformers import AutoProcessor

    from student.model import load_model

    records, _ = load_split(shapes_world, "test", limit=1)
    records[0]["image"] = b"not a png"
    with pytest.raises(ValueError, match=f"{records[0]['id']}.*image"):
        evaluate(load_model(checkpoint), AutoProcessor.from_pretrained(checkpoint), records, progress=False)
