"""The backend interface: what the Serve deployment needs from whatever runs the teacher.

The deployment (validation, batching, queueing, placement) and every caller only see this interface,
so a vLLM backend (prompt log-probs from a vLLM engine) plugs in under the name "vllm" in
`teacher_service.backends` without touching them.

Contract for a backend class (the registry calls it as `Backend(model, **options)`):

* `__init__(model: str, *, device="auto", dtype="auto", model_id=None, torch_threads=None, **extra)`:
  model is a local checkpoint directory; model_id overrides `identity.model_id(model)`; unknown
  extra options should raise TypeError (a typo must not pass silently).
* set `self.info` (a TeacherInfo) so validation knows vocab size, image token and image shape.
* `score(requests)` answers validated, prepared requests in order, following the protocol's
  position convention exactly (`teacher_service.protocol` docstring); top-k and tail mass from
  fp32 log-softmax (`teacher_service.scoring.score_rows` does that from logits or hidden states).
"""
from __future__ import annotations

import io
from abc import ABC, abstractmethod

from teacher_service.errors import TeacherRequestError
from teacher_service.protocol import Limits, ScoreRequest, ScoreResponse, TeacherInfo

__all__ = ["TeacherBackend", "decode_images", "with_pixel_values"]


class TeacherBackend(ABC):
    """A frozen teacher that scores batches of validated requests."""

    name: str = "base"
    info: TeacherInfo

    def prepare(self, request: ScoreRequest, limits: Limits) -> ScoreRequest:
        """Per-request work that can fail on its own, before the request joins a batch.

        Runs after `protocol.validate`; decoding images belongs here, so a corrupt image fails only its
        own request (raise TeacherRequestError naming the field) and never the batch it would join.
        """
        return request

    @abstractmethod
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """One response per request, in order. Requests are validated and prepared."""

    def close(self) -> None:
        """Release the model (called when the replica shuts down)."""


def decode_images(request: ScoreRequest, limits: Limits) -> list:
    """The request's encoded images as RGB PIL images; a corrupt or oversized one raises
    TeacherRequestError naming it (images[i]), so it fails only its own request. Every backend uses this."""
    from PIL import Image

    pils = []
    for i, data in enumerate(request.images):
        name = f"images[{i}]"
        try:
            im = Image.open(io.BytesIO(bytes(data)))
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise TeacherRequestError(name, f"{w}x{h} pixels exceed the limit of {limits.max_image_pixels}")
            pils.append(im.convert("RGB"))
        except TeacherRequestError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever PIL says, it is this image's fault
            raise TeacherRequestError(name, f"cannot decode image: {type(e).__name__}: {e}") from None
    return pils


def with_pixel_values(request: ScoreRequest, limits: Limits, image_processor) -> ScoreRequest:
    """The request with its encoded images decoded and turned into fp32 pixel_values by the
    teacher's own image processor: the `prepare` of backends that run the HF model's preprocessing."""
    from dataclasses import replace

    import numpy as np

    if not request.images:
        return request
    pv = image_processor(images=decode_images(request, limits), return_tensors="np")["pixel_values"]
    return replace(request, images=(), pixel_values=np.ascontiguousarray(pv, dtype=np.float32))
