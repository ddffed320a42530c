"""The embedded teacher stage on Ray Train + DeepSpeed (2 workers, ZeRO-2), with its grounding loss.

The stage switches its model to eager attention (the grounding loss reads attention weights) and
exports a plain checkpoint; on one repeated batch of the world's chats both CE and the grounding term
fall. The other stages: test_training_stages.py.
"""
import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def trained(shapes_world, tmp_path_factory, ray_cluster):
    sys.path.insert(0, str(Path(__file__).parent))
    from training_rows import in_memory, tiny_recipe

    from actors.preprocess import image_seq_length_of, preprocess_record
    from actors.recipe import SourceSpec
    from actors.sources import load_source
    from student.training.pipeline import TrainOptions, run_stages
    from student.training.stage_model import stage_start_model
    from student.training.teacher_init import prepare_teacher_init

    run = tmp_path_factory.mktemp("teacher") / "run"
    shutil.copytree(shapes_world, run / "world")
    recipe = tiny_recipe(batch_size=4, max_steps={"teacher": STEPS})
    assert recipe.stages["teacher"].loss.ground > 0  # the shapes recipe grounds its teacher
    prepare_teacher_init(run, recipe, steps=20, echo=lambda s: None)
    _, proc = stage_start_model("teacher", run, recipe)
    table = load_source(SourceSpec(name="t", format="shapes", path=str(run / "world"), split="train", tasks=("chat",)))
    chats = [preprocess_record(r, proc, image_seq_length=image_seq_length_of(proc), max_length=1024, preference=False)
             for r in table.to_pylist()[:4]]
    rows = [{**r, "id": f"{r['id']}#{c}"} for c in range(STEPS) for r in chats]  # every global batch the same 4
    summary = run_stages(("teacher",), run, recipe, lambda r, s, d: in_memory(rows),
                         TrainOptions(checkpoint_every=STEPS, max_failures=1, progress=False))
    return run, summary


def test_the_teacher_stage_trains_with_grounding_and_both_terms_fall(trained):
    run, summary = trained
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("stage") == "teacher" and "loss/ground" in s]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), [s["step"] for s in steps]
    for term in ("loss/ce", "loss/ground"):
        assert steps[-1][term] < 0.8 * steps[0][term], (term, [s[term] for s in steps])


def test_the_exported_teacher_is_a_plain_checkpoint(trained):
    from student.model import load_model
    from student.training.stage_model import teacher_dir
    from training_rows import tiny_recipe

    run, _ = trained
    model = load_model(teacher_dir(run, tiny_recipe()))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config._attn_implementation != "eager"  # eager was the stage's, not the checkpoint's
