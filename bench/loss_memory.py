"""Peak memory and time of the chunked KD loss vs a naive full-vocab fp32 KD loss, on CPU.

Each variant runs in its own subprocess (torch's CPU allocations are invisible to tracemalloc), which
builds the inputs, resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs forward +
backward once, and reports VmHWM - VmRSS(before). Both variants start from the student's final
hidden states [B, T, H] and the lm_head weight [V, H] (both trainable, fp32) and the same teacher
signal, so the delta is the loss's own working memory plus grad(W) [V, H], which both pay.

    naive:   logits = hidden @ W^T for all B*T positions (what a plain HF forward does), select the
             response rows, fp32 log_softmax over V, divergence, autograd backward.
    chunked: student.losses.kd_loss(hidden[mask], teacher, lm_head_weight=W): chunks of rows, fp32
             per chunk, gradients folded into grad(hidden), grad(W) chunk by chunk.

Prints ONE JSON line. Defaults are the issue's (V = 151936, T = 2048); shrink with flags, e.g.
    .venv/bin/python bench/loss_memory.py --vocab 32000 --seq 512
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _inputs(a, torch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.batch, a.seq, a.hidden, generator=g).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    n_resp = max(1, round(a.response_frac * a.seq))
    mask = torch.zeros(a.batch, a.seq, dtype=torch.bool)
    mask[:, a.seq - n_resp :] = True  # the response sits at the end of the sequence
    n = int(mask.sum())
    from student.losses import FullTeacher, TopKTeacher

    if a.teacher == "topk":
        # what the teacher service ships: distinct int32 ids, fp16 log-probs, fp32 tail mass
        base = torch.randperm(a.vocab, generator=g)[: a.k]
        shift = torch.randint(0, a.vocab, (n, 1), generator=g)
        ids = ((base[None, :] + shift) % a.vocab).to(torch.int32)
        lp = torch.log_softmax(torch.randn(n, a.k + 1, generator=g) * 2, dim=-1)
        teacher = TopKTeacher(ids, lp[:, :-1].to(torch.float16), lp[:, -1].clone())
    else:
        teacher = FullTeacher(torch.log_softmax(torch.randn(n, a.vocab, generator=g) * 2, dim=-1).to(torch.float16))
    return hidden, weight, mask, teacher


def _naive(hidden, weight, mask, teacher, a, torch):
    """The plain way: full fp32 logits, full fp32 softmax, one autograd graph."""
    F = torch.nn.functional
    logits = hidden @ weight.T  # [B, T, V] fp32
    logq = F.log_softmax(logits[mask].float() / a.temperature, dim=-1)  # [N, V]
    if a.teacher == "full":
        logp = F.log_softmax(teacher.logprobs.float() / a.temperature, dim=-1)
        return F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    ids = teacher.ids.long()
    q = torch.cat([logq.gather(1, ids), torch.logsumexp(logq.scatter(1, ids, float("-inf")), -1, keepdim=True)], 1)
    p = F.log_softmax(torch.cat([teacher.logprobs.float(), teacher.tail_logmass[:, None]], 1) / a.temperature, dim=-1)
    return (p.exp() * (p - q)).sum(-1).mean()


def _chunked(hidden, weight, mask, teacher, a, torch):
    from student.losses import kd_loss

    return kd_loss(hidden[mask], teacher, lm_head_weight=weight, temperature=a.temperature, chunk_size=a.chunk_size)


def child(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    hidden, weight, mask, teacher = _inputs(a, torch)
    fn = {"naive": _naive, "chunked": _chunked}[a.child]
    gc.collect()
    reset = _reset_peak()
    base = _status_kib("VmRSS")
    if not reset:
        base = max(base, _status_kib("VmHWM"))
    t0 = time.perf_counter()
    loss = fn(hidden, weight, mask, teacher, a, torch)
    t_fwd = time.perf_counter() - t0
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {
        "peak_mib": round((peak - base) / 1024, 1),
        "time_s": round(elapsed, 2),
        "forward_s": round(t_fwd, 2),
        "loss": float(loss.detach()),
        "grad_w_norm": float(weight.grad.norm()),
        "peak_method": "VmHWM after clear_refs" if reset else "VmHWM (not reset; includes setup)",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=896, help="Qwen2-0.5B's hidden size")
    p.add_argument("--response-frac", type=float, default=1.0, help="fraction of the T positions distilled")
    p.add_argument("--teacher", choices=("topk", "full"), default="topk")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: ~64 MiB fp32 per chunk)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="chunked,naive")
    p.add_argument("--child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    results = {}
    forwarded = [x for x in (argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, *forwarded, "--child", v], capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"variant {v} failed:\n{out.stderr}")
        results[v] = json.loads(out.stdout.strip().splitlines()[-1])
    from student.losses.chunked import auto_chunk_size

    line = {
        "bench": "loss_memory",
        "vocab": a.vocab,
        "seq": a.seq,
        "batch": a.batch,
        "hidden": a.hidden,
        "positions": max(1, round(a.response_frac * a.seq)) * a.batch,
        "teacher": a.teacher if a.teacher == "full" else f"topk{a.k}",
        "chunk_size": a.chunk_size or auto_chunk_size(a.vocab),
        "threads": a.threads,
        "grad_w_mib": round(a.vocab * a.hidden * 4 / 2**20, 1),  # fp32 grad(W), inside both peaks
        **{f"{v}_{k}": r[k] for v, r in results.items() for k in ("peak_mib", "time_s")},
    }
    if {"chunked", "naive"} <= results.keys():
        c, n = results["chunked"], results["naive"]
        line["peak_ratio_naive_over_chunked"] = round(n["peak_mib"] / max(c["peak_mib"], 1e-9), 2)
        line["time_ratio_chunked_over_naive"] = round(c["time_s"] / max(n["time_s"], 1e-9), 2)
        line["loss_abs_diff"] = abs(c["loss"] - n["loss"])
        line["grad_w_norm_rel_diff"] = abs(c["grad_w_norm"] - n["grad_w_norm"]) / max(n["grad_w_norm"], 1e-30)
    line["peak_method"] = next(iter(results.values()))["peak_method"]
    print(json.dumps(line))


if __name__ == "__main__":
    main()
