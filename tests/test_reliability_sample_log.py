"""The sample log's counting rule (pure, no Ray): a restarted attempt supersedes the steps it redoes,
whatever the world size was; a torn last line is skipped and counted."""
import json

from student.training.sample_log import SampleLog, effective_steps, read_lines, sample_counts, sample_summary


def _write(stage_dir, rank, attempt, start, steps):
    log = SampleLog(stage_dir, rank, attempt, start)
    for step, epoch, ids in steps:
        log.write(step, epoch, ids)
    log.close()


def test_a_restart_supersedes_the_steps_it_redoes_even_at_another_world_size(tmp_path):
    # attempt 1: two ranks, steps 1-3 (a checkpoint after step 2), killed during step 3 -> one torn line
    _write(tmp_path, 0, 100, 0, [(1, 0, ["a"]), (2, 0, ["c"]), (3, 0, ["e"])])
    _write(tmp_path, 1, 100, 0, [(1, 0, ["b"]), (2, 0, ["d"]), (3, 0, ["f"])])
    with open(tmp_path / "samples" / "rank1.jsonl", "a") as f:
        f.write('{"attempt": 100, "start_step": 0, "step": 4, "ep')
    # attempt 2: ONE rank, resumed from step 2, redoes step 3 with other ids, then the rest of the epoch
    _write(tmp_path, 0, 200, 2, [(3, 0, ["e", "f"]), (4, 0, ["g", "h"]), (5, 1, ["a", "b"])])
    lines, torn = read_lines(tmp_path)
    assert torn == 1 and len(lines) == 9
    kept = effective_steps(lines)
    assert [(r["step"], r["rank"], r["attempt"]) for r in kept] == [
        (1, 0, 100), (1, 1, 100), (2, 0, 100), (2, 1, 100), (3, 0, 200), (4, 0, 200), (5, 0, 200)]
    counts = sample_counts(kept)
    assert dict(counts[0]) == dict.fromkeys("abcdefgh", 1) and dict(counts[1]) == {"a": 1, "b": 1}
    assert sample_summary(tmp_path) == {"rows": 10, "distinct": 8, "repeated_in_epoch": 0, "epochs": 2,
                                        "attempts": 2, "torn_lines": 1}


def test_a_fresh_start_supersedes_everything_and_repeats_are_counted(tmp_path):
    _write(tmp_path, 0, 1, 0, [(1, 0, ["a", "b"]), (2, 0, ["c", "d"])])
    _write(tmp_path, 0, 2, 0, [(1, 0, ["x", "y"]), (2, 0, ["x", "z"])])  # a new run of the stage, from step 0
    summary = sample_summary(tmp_path)
    assert summary["rows"] == 4 and summary["distinct"] == 3 and summary["repeated_in_epoch"] == 1
    line = json.loads((tmp_path / "samples" / "rank0.jsonl").read_text().splitlines()[0])
    assert line == {"attempt": 1, "start_step": 0, "step": 1, "epoch": 0, "rank": 0, "ids": ["a", "b"]}
