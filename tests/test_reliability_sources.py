"""Corrupt rows in every source format (issue #9): each bad row is rejected with its id and a reason,
counted, and rows in = rows used + rows rejected; a file that cannot be read at all is an error
naming it. Formats: `shapes` record Parquet, `llava_json` (JSON array and JSONL), `preference`
(RLAIF-V JSONL and Parquet, and record Parquet with chosen/rejected) in both the SFT and the
preference (chosen/rejected pairs) preprocessing modes.

One real Ray Data pass through `build_stage_data` (sft: no teacher involved) over five sources at
once, and the preference mode through the same `Preprocessor` with the stage's real `DataLedger`.
"""
import glob
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors import columns as C
from actors.pipeline import DataPlaneConfig, build_stage_data
from actors.preprocess import PreprocessConfig, Preprocessor, ProcessorSpec
from actors.recipe import SourceSpec, parse_recipe
from actors.rejects import DataLedger, close_pass
from actors.schema import RECORD_SCHEMA
from actors.sources import load_source


def _png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


def _turns(q="<image>\nWhat colour is it?", a="red", human="human", gpt="gpt"):
    return [{"from": human, "value": q}, {"from": gpt, "value": a}]


@pytest.fixture(scope="module")
def corrupt(shapes_world, tmp_path_factory):
    """{source name: (SourceSpec, {bad id: reason}, rows)} for five sources, each with good and bad rows."""
    root = tmp_path_factory.mktemp("corrupt")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        (images / f"ok{i}.png").write_bytes(_png((60 * i, 200, 30)))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    out = {}

    # shapes: the world's record Parquet, 6 good rows and 4 bad ones (same schema: the file is fine)
    table = pq.read_table(sorted(glob.glob(f"{shapes_world}/train/*.parquet")))
    recs = [r for r in table.to_pylist() if r["task"] in ("vqa", "pope")][:10]
    recs[1]["image"] = b"not an image"
    recs[3]["messages"] = []
    recs[5]["messages"] = [{"role": "narrator", "content": "<image>hi"}, {"role": "assistant", "content": "x"}]
    recs[7]["image"] = None
    bad = {recs[1]["id"]: "undecodable_image", recs[3]["id"]: "empty_conversation", recs[5]["id"]: "bad_role",
           recs[7]["id"]: "no_image"}
    (root / "shapes" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(recs, schema=RECORD_SCHEMA), root / "shapes" / "train" / "part-0.parquet")
    out["shapes"] = (dict(format="shapes", path=str(root / "shapes"), split="train"), bad, len(recs))

    # llava_json, a JSON array: 3 good, an element that is not an object, an unknown role, no answer, a missing file
    rows = [{"id": f"lj-{i}", "image": f"ok{i}.png", "conversations": _turns()} for i in range(3)]
    rows += ["oops, a string", {"id": "lj-robot", "image": "ok0.png", "conversations": _turns(gpt="robot")},
             {"id": "lj-silent", "image": "ok1.png", "conversations": _turns()[:1]},
             {"id": "lj-missing", "image": "gone/nowhere.png", "conversations": _turns()}]
    (root / "llava.json").write_text(json.dumps(rows))
    bad = {"llava-array-3": "malformed_record", "lj-robot": "bad_role", "lj-silent": "no_response",
           "lj-missing": "missing_image"}
    out["llava-array"] = (dict(format="llava_json", path=str(root / "llava.json"), image_root=str(images)), bad, len(rows))

    # llava_json, JSONL: 2 good, a line that is not JSON, two <image> placeholders for one image
    lines = [json.dumps({"id": f"jl-{i}", "image": f"ok{i}.png", "conversations": _turns()}) for i in range(2)]
    lines += ['{"id": "jl-torn", "image": "ok0.png", "conversa', json.dumps(
        {"id": "jl-two", "image": "ok2.png", "conversations": _turns(q="<image><image>\nSame?")})]
    (root / "llava.jsonl").write_text("\n".join(lines) + "\n")
    bad = {"llava-lines-2": "malformed_record", "jl-two": "image_token_count"}
    out["llava-lines"] = (dict(format="llava_json", path=str(root / "llava.jsonl"), image_root=str(images)), bad, len(lines))

    # preference, RLAIF-V JSONL: 2 good, a torn line, a missing image, no chosen answer
    pref = [{"id": f"pj-{i}", "image": f"ok{i}.png", "question": "What colour?", "chosen": "red", "rejected": "blue"}
            for i in range(2)]
    lines = [json.dumps(p) for p in pref] + ["not json at all", json.dumps(
        {"id": "pj-gone", "image": "gone.png", "question": "Q?", "chosen": "a", "rejected": "b"}), json.dumps(
        {"id": "pj-nochosen", "image": "ok0.png", "question": "Q?", "rejected": "b"})]
    (root / "pref.jsonl").write_text("\n".join(lines) + "\n")
    bad = {"pref-lines-2": "malformed_record", "pj-gone": "missing_image", "pj-nochosen": "no_response"}
    out["pref-lines"] = (dict(format="preference", path=str(root / "pref.jsonl"), image_root=str(images)), bad, len(lines))

    # preference, RLAIF-V Parquet with embedded bytes: 2 good, undecodable bytes, no question
    prows = [{"idx": f"pp-{i}", "image": {"bytes": _png(), "path": None}, "question": "Colour?", "chosen": "red",
              "rejected": "blue"} for i in range(2)]
    prows += [{"idx": "pp-garbled", "image": {"bytes": b"\xff\xd8 truncated jpeg", "path": None}, "question": "Q?",
               "chosen": "a", "rejected": "b"},
              {"idx": "pp-noquestion", "image": {"bytes": _png(), "path": None}, "question": None, "chosen": "a",
               "rejected": "b"}]
    (root / "pref-pq").mkdir()
    pq.write_table(pa.Table.from_pylist(prows), root / "pref-pq" / "part-0.parquet")
    bad = {"pp-garbled": "undecodable_image", "pp-noquestion": "image_token_count"}  # SFT: no prompt, no <image>
    out["pref-parquet"] = (dict(format="preference", path=str(root / "pref-pq")), bad, len(prows))
    return out


def _sources(corrupt):
    # weights proportional to the sizes: every row exactly once in the pass (no mixing repeats)
    return [{"name": name, "weight": float(n), **spec} for name, (spec, _, n) in corrupt.items()]


def test_corrupt_rows_in_every_format_are_rejected_counted_and_balanced(ray_cluster, corrupt, shapes_world, tmp_path):
    recipe = parse_recipe({"name": "corrupt", "seed": 0, "stages": {"sft": {"sources": _sources(corrupt)}}})
    stage_dir = tmp_path / "stages" / "sft"
    data = build_stage_data(recipe, "sft", processor=ProcessorSpec(tokenizer=str(shapes_world / "tokenizer")),
                            out_dir=stage_dir, config=DataPlaneConfig(batch_size=8, preprocess_actors=(1, 1),
                                                                      max_reject_rate=0.9))
    rows = data.dataset.take_all()
    summary = data.close_pass()
    expected = {i: reason for _, bad, _ in corrupt.values() for i, reason in bad.items()}
    total = sum(n for _, _, n in corrupt.values())
    assert data.planned_rows == total == 30
    assert summary["rows_in"] == total and summary["rows_rejected"] == len(expected) == 15
    assert summary["rows_out"] == len(rows) == total - len(expected) and not summary["problems"]

    rejects = pq.read_table(stage_dir / "rejects.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == expected
    assert not {r[C.ID] for r in rows} & set(expected)  # no bad row was used
    by_id = {r["id"]: r for r in rejects}
    for name, (_, bad, _) in corrupt.items():  # each reject names its source
        assert all(by_id[i]["source"] == name for i in bad)
    # the messages say what exactly is wrong, with the file and line for unparseable records
    assert "llava.jsonl:3: not valid JSON (Unterminated string" in by_id["llava-lines-2"]["detail"]
    assert "pref.jsonl:3: not valid JSON" in by_id["pref-lines-2"]["detail"]
    assert "record 3 of source 'llava-array' is a JSON str, not an object" in by_id["llava-array-3"]["detail"]
    assert "turn 1 has role 'robot'" in by_id["lj-robot"]["detail"]
    assert "gone/nowhere.png does not exist" in by_id["lj-missing"]["detail"]
    assert "2 <image> placeholder(s) for 1 image(s)" in by_id["jl-two"]["detail"]
    assert "embedded bytes" in by_id["pp-garbled"]["detail"]
    stats = json.loads((stage_dir / "data_stats.json").read_text())
    assert stats["passes"][0]["reasons"] == dict(Counter(expected.values()))


def test_preference_mode_rejects_broken_pairs_and_balances(ray_cluster, corrupt, shapes_world, tmp_path):
    """The preference stage's preprocessing (chosen/rejected pairs) on the preference-format sources
    plus the world's own preference records, one of them without a rejected answer."""
    world_pref = [r for r in pq.read_table(sorted(glob.glob(f"{shapes_world}/train/*.parquet"))).to_pylist()
                  if r["task"] == "preference"][:4]
    world_pref[2]["rejected"] = ""
    (tmp_path / "world" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(world_pref, schema=RECORD_SCHEMA), tmp_path / "world" / "train" / "p.parquet")
    specs = [SourceSpec(name=n, **corrupt[n][0]) for n in ("pref-lines", "pref-parquet")]
    specs.append(SourceSpec(name="world-pref", format="preference", path=str(tmp_path / "world"), split="train"))
    table = pa.concat_tables([load_source(s) for s in specs])
    expected = {**corrupt["pref-lines"][1], **corrupt["pref-parquet"][1], world_pref[2]["id"]: "bad_preference"}
    expected["pj-nochosen"] = "bad_preference"  # in pair mode a missing chosen answer is a broken pair
    expected["pp-noquestion"] = "bad_preference"  # and so is a pair without a prompt

    ledger = DataLedger.remote("preference", str(tmp_path / "stages" / "preference"), ["preprocess"],
                               max_reject_rate=0.9, expected_rows=table.num_rows)
    pre = Preprocessor(PreprocessConfig(ProcessorSpec(tokenizer=str(shapes_world / "tokenizer")), preference=True),
                       ledger=ledger)
    out = pre(table)
    summary = close_pass(ledger)
    assert summary["rows_in"] == table.num_rows == 13 and summary["rows_rejected"] == len(expected) == 6
    assert out.num_rows == summary["rows_out"] == 7 and not summary["problems"]
    assert C.CHOSEN_INPUT_IDS in out.column_names and C.REJECTED_LABELS in out.column_names
    rejects = pq.read_table(tmp_path / "stages" / "preference" / "rejects.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == expected


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
    (tmp_path / "bad-pq").mkdir()
    (tmp_path / "bad-pq" / "part-0.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match=r"source 'p': .*bad-pq/part-0.parquet is not a readable Parquet file"):
        load_source(SourceSpec(name="p", format="preference", path=str(tmp_path / "bad-pq")))
    (tmp_path / "array.json").write_text('[{"id": 1}, {"id": 2')
    with pytest.raises(ValueError, match=r"array.json: not valid JSON \(.* at line 1, column \d+\)"):
        load_source(SourceSpec(name="j", format="llava_json", path=str(tmp_path / "array.json")))
    (tmp_path / "latin1.jsonl").write_bytes('{"id": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text"):
        load_source(SourceSpec(name="l", format="llava_json", path=str(tmp_path / "latin1.jsonl")))
