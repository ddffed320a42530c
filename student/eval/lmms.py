"""lmms-eval adapter (extra `eval`): evaluate a distilled student on real benchmarks (GQA, POPE, MME, ...).

`ModDistillLlava` is an lmms-eval model that loads an HF Llava checkpoint with
student.model.loading.load_model and answers with student.eval's batched greedy decoding, so
benchmark numbers and shapes-world numbers come from the same decoding code. It is registered for
`lmms-eval --model mod_distill` through the `lmms_eval.models` entry point (pyproject.toml), and
`python -m student.eval.lmms` runs lmms-eval in-process with it, optionally on the shapes world as
local lmms-eval tasks (no downloads: student.eval.lmms_tasks).

lmms-eval pulls torchvision and many other packages, so it lives in its own environment
(docs/evaluation.md); nothing else in the project imports this module.
"""
from __future__ import annotations

import json

import torch

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("student.eval.lmms needs lmms-eval: pip install -e '.[eval]' (docs/evaluation.md)") from e

from student.eval.decode import DecodeConfig, build_prompt, decode_image, greedy_decode

__all__ = ["ModDistillLlava", "manifest", "MODEL_ID"]

MODEL_ID = "mod_distill"
IMAGE = "<image>"


def _stop(text: str, until) -> str:
    """Cut a generation at the first of lmms-eval's stop strings."""
    for s in ([until] if isinstance(until, str) else until or []):
        if s and s in text:
            text = text[: text.index(s)]
    return text


class ModDistillLlava(lmms):
    """lmms-eval model over a local HF Llava checkpoint (dense or MoE student, or the teacher)."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 8, dtype: str = "float32",
                 max_new_tokens: int | str = 128, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"mod_distill: unknown model_args {sorted(kwargs)}; known: pretrained, device, "
                             "batch_size, dtype, max_new_tokens")
        from transformers import AutoProcessor

        from student.model.loading import load_model

        self._model = load_model(pretrained, dtype=getattr(torch, dtype)).to(device).eval()
        self._processor = AutoProcessor.from_pretrained(pretrained, local_files_only=True)
        self._batch_size = int(batch_size)
        self._max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    def _record(self, i: int, context: str, visuals) -> dict:
        images = list(visuals or [])
        if not images:
            raise ValueError(f"mod_distill: request {i} has no image; text-only benchmarks are not supported")
        if IMAGE not in context:  # lmms-eval contexts carry no image placeholder
            context = IMAGE * len(images) + context
        return {"id": str(i), "task": "lmms", "image": images, "messages": [{"role": "user", "content": context}]}

    def generate_until(self, requests) -> list[str]:
        records, stops = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if gen_kwargs.get("temperature", 0) or gen_kwargs.get("do_sample", False) or gen_kwargs.get("num_beams", 1) > 1:
                raise ValueError(f"mod_distill: only greedy decoding is supported, got {json.dumps(gen_kwargs, default=str)}")
            rec = self._record(i, context, doc_to_visual(self.task_dict[task][split][doc_id]))
            rec["max_new_tokens"] = int(gen_kwargs.get("max_new_tokens", self._max_new_tokens))
            records.append(rec)
            stops.append(gen_kwargs.get("until"))
        answers = greedy_decode(self._model, self._processor, records, DecodeConfig(batch_size=self._batch_size),
                                progress=self.rank == 0)
        return [_stop(a, s) for a, s in zip(answers, stops)]

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log p(continuation | image, context) under the chat template, and whether it is the greedy one."""
        out = []
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            rec = self._record(i, context, doc_to_visual(doc))
            images = decode_image(rec["image"], rec["id"])
            prompt = build_prompt(self._processor, rec["messages"])
            head = self._processor(images=images, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
            batch = self._processor(images=images, text=[prompt + continuation], return_tensors="pt")
            batch = {k: (v.to(self.device, self._model.dtype) if v.is_floating_point() else v.to(self.device))
                     for k, v in batch.items()}
            logits = self._model(**batch).logits[0, head - 1:-1].float()
            target_ids = batch["input_ids"][0, head:]
            logp = torch.log_softmax(logits, -1).gather(-1, target_ids[:, None]).sum().item()
            out.append((logp, bool((logits.argmax(-1) == target_ids).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mod_distill: multi-round generation is not supported")


def manifest():
    """The `lmms_eval.models` entry point: makes `lmms-eval --model mod_distill` find this class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.ModDistillLlava")
