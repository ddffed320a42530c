"""The run report from a run directory written by the test: metrics.jsonl in the layout's format and
student.eval results scored from hand-made predictions."""
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from actors.shapes.tasks import caption
from actors.shapes.vocab import POSITIONS
from actors.shapes.world import Obj
from student.eval.metrics import score_predictions
from student.report import build_report, read_metrics
from student.report.__main__ import main
from student.report.tables import expert_load_table, teacher_gap_table

RED = Obj(shape="circle", colour="red", size="small", cell=POSITIONS.index("top left"))
BLUE = Obj(shape="square", colour="blue", size="large", cell=POSITIONS.index("center"))
GHOST = Obj(shape="triangle", colour="green", size="small", cell=POSITIONS.index("bottom"))
OBJECTS = [dict(shape=o.shape, colour=o.colour, size=o.size, position=o.position) for o in (RED, BLUE)]


def _result(hallucinate: bool, vqa_right: int, stage: str, who: str) -> dict:
    """A student.eval-shaped result: 2 captions, 4 colour questions, 2 POPE probes."""
    cap_pred = caption([RED, BLUE, GHOST]) if hallucinate else caption([RED, BLUE])
    items = [{"id": f"c{i}", "task": "caption", "subtask": "clean", "answer": caption([RED, BLUE]),
              "prediction": cap_pred if i == 0 else caption([RED, BLUE]), "objects": OBJECTS} for i in range(2)]
    items += [{"id": f"v{i}", "task": "vqa", "subtask": "colour", "answer": "red",
               "prediction": "red" if i < vqa_right else "blue"} for i in range(4)]
    items += [{"id": "p0", "task": "pope", "subtask": "adversarial", "answer": "yes", "prediction": "yes"},
              {"id": "p1", "task": "pope", "subtask": "adversarial", "answer": "no", "prediction": "yes"}]
    res = score_predictions(items)
    res.update(stage=stage, who=who, parameters={"total": 3_000_000, "active": 2_000_000, "num_experts": 4, "top_k": 2})
    return res


def _step(stage, step, **values):
    return {"stage": stage, "step": step, "epoch": 0, "time_s": 0.1, "lr": 1e-3, "tokens_per_s": 1000.0,
            "teacher_wait_s": 0.01, **values}


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    lines = []
    for s in range(10):
        lines.append(_step("d2d", s, **{"loss/total": 2.0 - 0.1 * s, "loss/kl": 2.0 - 0.1 * s}))
    for s in range(10):
        loads = {f"router/layer{L}/expert{e}": (0.4 if e == 0 else 0.2) for L in (0, 2) for e in range(4)}
        lines.append(_step("d2s", s, **{"loss/total": 1.5 - 0.05 * s, "loss/ce": 1.0, "loss/kl": 0.5,
                                        "loss/aux": 0.01, "router/layer0/entropy": 1.3}, **loads))
    lines.append(_step("d2s", 9, **{"loss/total": 1.0, "loss/ce": 0.6, "loss/kl": 0.4}))  # re-logged after a resume
    for s in range(5):
        lines.append(_step("preference", s, **{"loss/total": 0.69 - 0.01 * s, "loss/dpo": 0.69 - 0.01 * s,
                                               "dpo/margin": 0.1 * s, "dpo/accuracy": 0.5 + 0.1 * s}))
    text = "\n".join(json.dumps(x) for x in lines[:12]) + "\nnot json\n" + "\n".join(json.dumps(x) for x in lines[12:])
    (run / "metrics.jsonl").write_text(text + "\n")
    for stage, who, hal, right in (("d2s", "teacher", True, 3), ("d2s", "student", True, 2),
                                   ("preference", "teacher", True, 3), ("preference", "student", False, 2)):
        (run / "eval" / f"{stage}_{who}.json").write_text(json.dumps(_result(hal, right, stage, who)))
    (run / "eval" / "garbage.json").write_text("{}")
    return run


def test_metrics_are_deduplicated_and_bad_lines_counted(run_dir):
    m = read_metrics(run_dir / "metrics.jsonl")
    assert m.stages() == ["d2d", "d2s", "preference"]
    assert (m.skipped_lines, m.duplicates) == (1, 1)
    assert len(m.of("d2s")) == 10 and m.of("d2s")[-1]["loss/total"] == 1.0  # the later record wins


def test_report_renders_tables_and_plots(run_dir):
    out = build_report(run_dir)
    assert out == run_dir / "report.md"
    md = out.read_text()
    for png in ("loss_total", "loss_d2d", "loss_d2s", "loss_preference", "experts_d2s"):
        path = run_dir / "plots" / f"{png}.png"
        assert path.exists() and f"(plots/{png}.png)" in md
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert not (run_dir / "plots" / "experts_d2d.png").exists()  # a dense stage has no expert plot
    # hallucination rows: one of two captions invents an object for all but the preference student
    assert "| d2s | student | 50.0 | 20.0 |" in md
    assert "| preference | student | 0.0 | 0.0 |" in md
    # comprehension: the student gets 2 of 4 colour questions, the teacher 3 of 4
    assert "| d2s | teacher | 2.00M / 3.00M E4T2 | 75.0 |" in md
    # student minus teacher: VQA -25 points; Resp -50 points after preference
    assert "| preference | -25.0 | +0.0 | +50.0 | +0.0 | -50.0 | -20.0 |" in md
    assert "garbage.json: skipped" in md
    assert "1 malformed line(s) skipped, 1 step(s) logged again" in md


def test_expert_load_table_ratios(run_dir):
    table = expert_load_table(read_metrics(run_dir / "metrics.jsonl").of("d2s"))
    rows = [r for r in table.splitlines() if r.startswith("| 0 ") or r.startswith("| 2 ")]
    assert rows[0] == "| 0 | 0.400 | 0.200 | 0.200 | 0.200 | 2.00 | 1.300 |"
    assert rows[1] == "| 2 | 0.400 | 0.200 | 0.200 | 0.200 | 2.00 | - |"
    assert expert_load_table([{"stage": "d2d", "step": 0, "loss/total": 1.0}]) is None


def test_teacher_evaluated_once_serves_every_stage():
    evals = {("teacher", "teacher"): _result(False, 4, "teacher", "teacher"),
             ("d2s", "student"): _result(False, 2, "d2s", "student")}
    assert "| d2s | -50.0 |" in teacher_gap_table(evals)


def test_cli_on_an_empty_run_says_what_is_missing(tmp_path):
    res = CliRunner().invoke(main, [str(tmp_path)])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report.md").read_text()
    assert "No evaluation results" in md and "No training metrics" in md
