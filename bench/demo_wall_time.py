"""P6: wall time of the embedded default end to end (`python -m student.train` with no flags; goal <= 10 min
on 2 cores).

Runs the CLI in a fresh process into a temporary run directory (`--run-dir` only says where; the
run itself is the default one) and reports the total wall time, and per stage: the wall-clock span
from the previous stage's last output line to this stage's last one (so it holds the stage's data
preparation, Ray Train start-up, training, export and evaluation), plus the steps, train-loop wall
time and step time the run directory records (RUN/stages/<stage>/summary.json). `setup_s` is the
time until Ray is up (world generation, models.json); `report_s` what follows the last stage.

It takes ~9-10 minutes and means nothing while other jobs share the cores, so `run_all.py` skips it
unless given --with-demo or MOD_DISTILL_BENCH_DEMO=1. Extra CLI flags after `--` go to the trainer
(e.g. `-- --max-steps 2 --no-eval` to check the plumbing in a few minutes; the JSON then says so).

    .venv/bin/python bench/demo_wall_time.py [--keep DIR] [-- TRAIN_FLAGS...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage_of(line: str, stages: list[str]) -> str | None:
    """The stage an output line belongs to ("stage d2d: ...", "eval student after d2d: ..."), if any."""
    if line.startswith("stage "):
        name = line[6:].split(":", 1)[0]
        return name if name in stages else None
    if line.startswith("eval ") and " after " in line:
        name = line.split(" after ", 1)[1].split(":", 1)[0]
        return name if name in stages else None
    return None


def spans(lines: list[tuple[float, str]], stages: list[str], end: float) -> dict:
    """{setup_s, per-stage span_s, report_s} from timestamped output lines (seconds since start)."""
    ray_up = next((t for t, s in lines if s.startswith("ray: ")), None)
    last: dict[str, float] = {}
    for t, s in lines:
        st = stage_of(s, stages)
        if st is not None:
            last[st] = t
    out, prev = {"setup_s": None if ray_up is None else round(ray_up, 1)}, ray_up or 0.0
    per = {}
    for st in stages:
        if st in last:
            per[st] = round(last[st] - prev, 1)
            prev = last[st]
    out["stages"] = per
    out["report_s"] = round(end - prev, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one, removed)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("train_flags", nargs="*", help="extra flags for student.train, after --")
    a = ap.parse_args()

    tmp = None if a.keep else tempfile.mkdtemp(prefix="demo-wall-")
    run_dir = Path(a.keep or tmp) / "run"
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("RAY_ADDRESS", None)  # the embedded default starts its own local Ray
    cmd = [sys.executable, "-m", "student.train", "--run-dir", str(run_dir), *a.train_flags]
    load = os.getloadavg()
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        rc = proc.wait(timeout=a.timeout)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().strip().splitlines()[-5:]
    stages_run = next((s.split("stages: ", 1)[1].split(" -> ") for _, s in lines if s.startswith("ray: ") and "stages: " in s), [])
    result = {"bench": "demo_wall_time", "command": " ".join(["python -m student.train", *a.train_flags]) or "python -m student.train",
              "default_run": not a.train_flags, "exit_code": rc, "wall_s": round(wall, 1), "goal_s": 600,
              "goal_met": rc == 0 and not a.train_flags and wall <= 600, "cpu_cores": os.cpu_count(),
              "load_average_at_start": [round(x, 2) for x in load]}
    result.update(spans(lines, stages_run, wall))
    steps = {}
    for st in stages_run:
        f = run_dir / "stages" / st / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            steps[st] = {k: round(s[k], 3) if isinstance(s.get(k), float) else s.get(k)
                         for k in ("steps", "wall_s", "step_time_s", "setup_s") if k in s}
    result["train_loops"] = steps
    if rc != 0:
        result["error"] = f"student.train exited {rc}"
        result["stderr_tail"] = tail
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
