"""Run every benchmark in bench/ (each prints ONE JSON line) and print their lines (`make bench`).

Each bench runs in its own process with OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=PASSIVE unless set,
one after another (they measure ratios within their own run, so running them side by side would
only add noise). A bench that fails or prints no JSON line is reported as
{"bench": NAME, "error": ...}; the exit status is 1 if any did.

    .venv/bin/python bench/run_all.py [--only teacher_batching moe_vs_dense] [--skip vllm_parity] [--timeout 1800]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        if isinstance(out, dict):
            return out
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="bench names (file stems) to run")
    ap.add_argument("--skip", nargs="*", default=[], help="bench names to leave out")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per bench")
    a = ap.parse_args()

    names = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != Path(__file__).stem and not p.stem.startswith("_"))
    if a.only is not None:
        unknown = set(a.only) - set(names)
        if unknown:
            ap.error(f"unknown bench(es) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in a.only]
    names = [n for n in names if n not in a.skip]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    failed = 0
    for name in names:
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], cwd=BENCH.parent, env=env,
                                  capture_output=True, text=True, timeout=a.timeout)
            out = last_json_line(proc.stdout)
            if proc.returncode != 0 or out is None:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                out = {"bench": name, "error": f"exit {proc.returncode}", "tail": tail, **({"result": out} if out else {})}
        except subprocess.TimeoutExpired:
            out = {"bench": name, "error": f"timed out after {a.timeout} s"}
        failed += "error" in out
        out.setdefault("bench", name)
        out["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
