"""Run every benchmark in bench/ (each prints ONE JSON line) and print their lines (`make bench`).

Each bench runs in its own process with OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=PASSIVE unless set,
one after another (they measure ratios within their own run, so running them side by side would
only add noise). A bench that fails or prints no JSON line is reported as
{"bench": NAME, "error": ...}; the exit status is 1 if any did.

    .venv/bin/python bench/run_all.py [--only teacher_batching moe_vs_dense] [--skip vllm_parity] [--timeout 1800]
                                      [--with-demo]

`demo_wall_time` (P6: the whole embedded default, ~10 minutes, meaningless on busy cores) and
`teacher_position_probe` (a research probe of the teacher's reading, ~3 minutes) run only with
--with-demo or MOD_DISTILL_BENCH_DEMO=1 (or when named in --only).
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
OPT_IN = ("demo_wall_time", "teacher_position_probe")  # benches that run only when asked for
NEEDS = {"vllm_parity": BENCH.parent / ".venv-vllm" / "bin" / "python"}  # skipped (not failed) when absent


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        if isinstance(out, dict):
            return out
    return None


def all_benches() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if p.stem != Path(__file__).stem and not p.stem.startswith("_"))


def select(names: list[str], only: list[str] | None, skip: list[str], with_demo: bool) -> list[str]:
    """The benches to run: --only (which may name an opt-in bench), else all but the opt-in ones
    unless with_demo; then minus --skip."""
    if only is not None:
        unknown = set(only) - set(names)
        if unknown:
            raise ValueError(f"unknown bench(es) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in only]
    elif not with_demo:
        names = [n for n in names if n not in OPT_IN]
    return [n for n in names if n not in skip]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="bench names (file stems) to run")
    ap.add_argument("--skip", nargs="*", default=[], help="bench names to leave out")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per bench")
    ap.add_argument("--with-demo", action="store_true", default=os.environ.get("MOD_DISTILL_BENCH_DEMO") == "1",
                    help=f"also run {', '.join(OPT_IN)} (or MOD_DISTILL_BENCH_DEMO=1)")
    a = ap.parse_args()

    try:
        names = select(all_benches(), a.only, a.skip, a.with_demo)
    except ValueError as e:
        ap.error(str(e))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    failed = 0
    for name in names:
        t0 = time.time()
        if name in NEEDS and not NEEDS[name].exists():
            print(json.dumps({"bench": name, "skipped": f"{NEEDS[name]} not found (make vllm-env)"}), flush=True)
            continue
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
