"""The teacher wire protocol (version 2): requests and responses as dataclasses of NumPy arrays.

NumPy arrays cross Ray's object store without pickling their data; torch tensors would be pickled
and copied, so none appear here. A response crosses the object store *packed* (version 2): its
arrays travel as ONE bytes payload plus a tiny layout (dtype and shape per array) and come back as
read-only views into that payload. Ray frames every NumPy buffer separately (~160 B each), which cost
~520 B per response in version 1 (a request of 28 positions paid 19 B per scored token for it).
Version 1 callers are refused by `validate` (field "version"). Over HTTP the same dataclasses
travel as npz (no pickle: `np.load(..., allow_pickle=False)`), see `encode_*` / `decode_*`.

Position convention (the same as `student.losses.positions` and causal-LM cross-entropy): the logits
at position t predict token t+1. So

* `positions[i] = t` asks for the teacher's next-token distribution *after* token t, i.e. the row a
  student selects with `select_mask(...)` at t. Rows come back in the order of `positions`; pass
  `positions_from_mask(mask)` (row-major `x[mask]` order) to line up with the losses.
* `target_ids[i]` is scored at `positions[i]`: log p(target_ids[i] | tokens <= positions[i]).
* `sequence_mask[t] = True` adds log p(input_ids[t] | tokens < t), taken from the logits at t-1, to
  `sequence_logprob` (exactly `student.losses.sequence_logps` with labels = input_ids where the mask
  is set); `sequence_mask[0]` must be False because nothing predicts the first token.

`input_ids` are *after* image-token expansion: each image contributes `image_seq_length` image tokens
(36 for 48x48 images with 8 px patches), and images are consumed in the order of their tokens.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from teacher_service.errors import TeacherRequestError

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_TOP_K",
    "Limits",
    "TeacherInfo",
    "ScoreRequest",
    "ScoreResponse",
    "make_request",
    "positions_from_mask",
    "validate",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
    "response_nbytes",
    "pack_arrays",
    "unpack_arrays",
]

PROTOCOL_VERSION = 2  # 2: responses pickle packed (one payload per response); requests unchanged
DEFAULT_TOP_K = 64
LOGPROB_DTYPES = ("float16", "float32")
RELATION_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Limits:
    """Per-request size limits; a request over any of them is rejected with the field named."""

    max_tokens: int = 4096  # len(input_ids), after image-token expansion
    max_images: int = 8
    max_image_bytes: int = 8 << 20  # one encoded image
    max_image_pixels: int = 4096 * 4096  # decoded width x height (decompression bombs)
    max_top_k: int = 1024
    max_requests_per_call: int = 64  # one `score_many` handle call carries at most this many requests

    def __post_init__(self) -> None:
        for f in fields(self):
            if int(getattr(self, f.name)) < 1:
                raise ValueError(f"Limits.{f.name} must be >= 1, got {getattr(self, f.name)}")

    @property
    def max_body_bytes(self) -> int:
        """Upper bound of an honest encoded request (HTTP ingress rejects larger bodies up front)."""
        return self.max_images * self.max_image_bytes + self.max_tokens * 16 + (1 << 20)


@dataclass(frozen=True)
class TeacherInfo:
    """What a replica serves; a client compares model_id / tokenizer_hash with what it expects."""

    model_id: str
    tokenizer_hash: str
    backend: str
    vocab_size: int  # the tokenizer's; top-k and log-softmax run over these ids only
    image_token_id: int
    image_seq_length: int  # image tokens per image
    image_shape: tuple[int, int, int] | None  # (C, H, W) of preprocessed pixel_values, None if unknown
    pad_token_id: int
    dtype: str
    device: str
    limits: Limits = field(default_factory=Limits)
    protocol_version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherInfo":
        d = dict(d)
        d["limits"] = Limits(**d["limits"])
        if d.get("image_shape") is not None:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


@dataclass(frozen=True, eq=False)
class ScoreRequest:
    """One sequence to score. Build it with `make_request`, which coerces dtypes."""

    input_ids: np.ndarray  # int32 [T]
    positions: np.ndarray | None = None  # int32 [N]: per-position outputs (top-k, targets) at these t
    images: tuple[bytes, ...] = ()  # encoded images (PNG/JPEG/...), in image-token order
    pixel_values: np.ndarray | None = None  # float32/float16 [n_images, C, H, W], the teacher's preprocessing
    top_k: int = DEFAULT_TOP_K  # 0: no top-k
    logprobs_dtype: str = "float16"  # dtype of topk_logprobs: "float16" (wire default) or "float32"
    target_ids: np.ndarray | None = None  # int32 [N]: log-prob of these tokens at `positions`
    sequence_mask: np.ndarray | None = None  # bool [T]: summed log p(input_ids[t] | < t) where True
    relation: bool = False  # return y_v y_v^T per image
    relation_dtype: str = "float32"  # "float32": raw R; "float16": R / ||R||_F (cosine is scale-free)
    request_id: str = ""
    version: int = PROTOCOL_VERSION

    @property
    def num_tokens(self) -> int:
        return int(np.asarray(self.input_ids).shape[0])

    @property
    def num_images(self) -> int:
        return len(self.images) if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass(frozen=True, eq=False)
class ScoreResponse:
    """The teacher's answer; every field the request did not ask for is None."""

    model_id: str
    tokenizer_hash: str
    request_id: str = ""
    topk_ids: np.ndarray | None = None  # int32 [N, k]
    topk_logprobs: np.ndarray | None = None  # float16 (or float32) [N, k], descending
    tail_logmass: np.ndarray | None = None  # float32 [N]: log of the mass outside the top-k (fp32 logits)
    target_logprobs: np.ndarray | None = None  # float32 [N]
    sequence_logprob: float | None = None  # sum over sequence_mask (fp64 accumulation of fp32 log-probs)
    relation: np.ndarray | None = None  # [n_images, Np, Np]
    version: int = PROTOCOL_VERSION

    def __reduce__(self):
        # Packed: identity strings, a layout and ONE payload of all arrays (see the module docstring).
        layout, payload = pack_arrays([getattr(self, f) for f in _PACKED_FIELDS])
        return (_response_from_packed, (self.model_id, self.tokenizer_hash, self.request_id, self.sequence_logprob,
                                        self.version, layout, payload))

    def to_topk_teacher(self):
        """As `student.losses.TopKTeacher` (torch tensors, copied: the arrays may be read-only)."""
        import torch

        from student.losses import TopKTeacher

        if self.topk_ids is None:
            raise ValueError("this response carries no top-k (request top_k > 0 with positions)")
        return TopKTeacher(torch.tensor(self.topk_ids), torch.tensor(self.topk_logprobs), torch.tensor(self.tail_logmass))


_PACKED_FIELDS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs", "relation")


def pack_arrays(arrays: list[np.ndarray | None]) -> tuple[str, bytes]:
    """(layout, payload): the arrays back to back in one bytes object, each at an offset aligned to its
    itemsize. layout: "dtype:d0,d1 ..." per array, "-" for a missing one ("<i4:28,64 <f2:28,64 -")."""
    layout, parts, offset = [], [], 0
    for a in arrays:
        if a is None:
            layout.append("-")
            continue
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise TypeError(f"cannot pack an object array ({a.dtype})")
        pad = -offset % a.dtype.itemsize
        parts += [bytes(pad), np.ascontiguousarray(a).tobytes()]
        offset += pad + a.nbytes
        layout.append(f"{a.dtype.str}:{','.join(map(str, a.shape))}")
    return " ".join(layout), b"".join(parts)


def unpack_arrays(layout: str, payload) -> list[np.ndarray | None]:
    """The arrays `pack_arrays` packed, as read-only views into `payload` (no copy)."""
    out, offset = [], 0
    for entry in layout.split(" "):
        if entry == "-":
            out.append(None)
            continue
        code, _, dims = entry.partition(":")
        dtype, shape = np.dtype(code), tuple(int(d) for d in dims.split(",") if d)
        offset += -offset % dtype.itemsize
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += count * dtype.itemsize
    if offset != len(payload):
        raise ValueError(f"packed response payload has {len(payload)} bytes, its layout describes {offset}")
    return out


def _response_from_packed(model_id, tokenizer_hash, request_id, sequence_logprob, version, layout, payload) -> ScoreResponse:
    arrays = dict(zip(_PACKED_FIELDS, unpack_arrays(layout, payload)))
    return ScoreResponse(model_id=model_id, tokenizer_hash=tokenizer_hash, request_id=request_id,
                         sequence_logprob=sequence_logprob, version=version, **arrays)


def positions_from_mask(mask) -> np.ndarray:
    """int32 positions of a bool [T] mask, in order: the rows `x[mask]` selects."""
    m = np.asarray(mask)
    if m.ndim != 1 or m.dtype != np.bool_:
        raise TeacherRequestError("positions", f"a mask must be bool [T], got {m.dtype} {m.shape}")
    return np.flatnonzero(m).astype(np.int32)


def _as_int32(x, name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.dtype.kind not in "iub":
        raise TeacherRequestError(name, f"expected integer ids, got dtype {a.dtype}")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise TeacherRequestError(name, "values do not fit int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def make_request(
    input_ids,
    *,
    positions=None,
    position_mask=None,
    images=(),
    pixel_values=None,
    top_k: int = DEFAULT_TOP_K,
    logprobs_dtype: str = "float16",
    target_ids=None,
    sequence_mask=None,
    relation: bool = False,
    relation_dtype: str = "float32",
    request_id: str = "",
) -> ScoreRequest:
    """A ScoreRequest from array-likes (lists, NumPy, CPU torch tensors), coerced to the wire dtypes.

    Give either `positions` (int indices) or `position_mask` (bool [T], converted in x[mask] order).
    """
    if positions is not None and position_mask is not None:
        raise TeacherRequestError("positions", "give positions or position_mask, not both")
    if position_mask is not None:
        pm = position_mask.detach().cpu().numpy() if hasattr(position_mask, "detach") else position_mask
        positions = positions_from_mask(np.asarray(pm, dtype=bool))
    conv = lambda x: None if x is None else np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)  # noqa: E731
    pv = conv(pixel_values)
    if pv is not None and pv.dtype not in (np.float16, np.float32):
        pv = pv.astype(np.float32)
    sm = conv(sequence_mask)
    return ScoreRequest(
        input_ids=_as_int32(input_ids, "input_ids").reshape(-1),
        positions=None if positions is None else _as_int32(positions, "positions").reshape(-1),
        images=tuple(bytes(b) for b in images),
        pixel_values=None if pv is None else np.ascontiguousarray(pv),
        top_k=int(top_k),
        logprobs_dtype=logprobs_dtype,
        target_ids=None if target_ids is None else _as_int32(target_ids, "target_ids").reshape(-1),
        sequence_mask=None if sm is None else np.ascontiguousarray(sm, dtype=bool).reshape(-1),
        relation=bool(relation),
        relation_dtype=relation_dtype,
        request_id=str(request_id),
    )


# ----------------------------------------------------------------------------------------------
# Validation: every check names the field, so a caller knows what to fix; the replica keeps serving.


def _need(cond: bool, name: str, reason: str) -> None:
    if not cond:
        raise TeacherRequestError(name, reason)


def _check_ids(a, name: str, length: int | None, vocab: int | None) -> None:
    _need(isinstance(a, np.ndarray), name, f"expected a NumPy array, got {type(a).__name__}")
    _need(a.dtype == np.int32, name, f"expected int32, got {a.dtype}")
    _need(a.ndim == 1, name, f"expected a 1-D array, got shape {a.shape}")
    if length is not None:
        _need(a.shape[0] == length, name, f"expected {length} entries, got {a.shape[0]}")
    if vocab is not None and a.size:
        lo, hi = int(a.min()), int(a.max())
        _need(lo >= 0 and hi < vocab, name, f"token ids must be in [0, {vocab}), got range [{lo}, {hi}]")


def validate(request: ScoreRequest, limits: Limits, info: TeacherInfo | None = None) -> None:
    """Raise TeacherRequestError(field, reason) for the first problem; None when the request is servable.

    Without `info` only the teacher-independent checks run (shapes, dtypes, limits, ranges).
    """
    _need(isinstance(request, ScoreRequest), "request", f"expected a ScoreRequest, got {type(request).__name__}")
    _need(request.version == PROTOCOL_VERSION, "version", f"protocol version {request.version} is not served (this teacher speaks {PROTOCOL_VERSION})")
    vocab = None if info is None else info.vocab_size

    ids = request.input_ids
    _check_ids(ids, "input_ids", None, vocab)
    t = ids.shape[0]
    _need(t >= 1, "input_ids", "empty sequence")
    _need(t <= limits.max_tokens, "input_ids", f"{t} tokens exceed the limit of {limits.max_tokens}")

    # Images: encoded bytes or preprocessed pixels, not both.
    _need(isinstance(request.images, tuple), "images", f"expected a tuple of bytes, got {type(request.images).__name__}")
    if request.images and request.pixel_values is not None:
        raise TeacherRequestError("images", "give encoded images or pixel_values, not both")
    for i, b in enumerate(request.images):
        _need(isinstance(b, (bytes, bytearray, memoryview)), f"images[{i}]", f"expected encoded image bytes, got {type(b).__name__}")
        _need(0 < len(b) <= limits.max_image_bytes, f"images[{i}]", f"{len(b)} bytes (limit {limits.max_image_bytes})")
    pv = request.pixel_values
    if pv is not None:
        _need(isinstance(pv, np.ndarray), "pixel_values", f"expected a NumPy array, got {type(pv).__name__}")
        _need(pv.dtype in (np.float32, np.float16), "pixel_values", f"expected float32 or float16, got {pv.dtype}")
        _need(pv.ndim == 4, "pixel_values", f"expected [n_images, C, H, W], got shape {pv.shape}")
        if info is not None and info.image_shape is not None:
            _need(tuple(pv.shape[1:]) == tuple(info.image_shape), "pixel_values", f"expected images of shape {tuple(info.image_shape)}, got {tuple(pv.shape[1:])}")
        _need(bool(np.isfinite(pv).all()), "pixel_values", "contains NaN or inf")
    n_img = request.num_images
    _need(n_img <= limits.max_images, "images", f"{n_img} images exceed the limit of {limits.max_images}")
    if info is not None:
        n_tok = int((ids == info.image_token_id).sum())
        want = n_img * info.image_seq_length
        _need(
            n_tok == want,
            "input_ids",
            f"{n_tok} image tokens (id {info.image_token_id}) but {n_img} image(s) x {info.image_seq_length} tokens = {want} expected",
        )

    # What to compute.
    pos = request.positions
    if pos is not None:
        _check_ids(pos, "positions", None, None)
        _need(pos.shape[0] <= limits.max_tokens, "positions", f"{pos.shape[0]} positions exceed the limit of {limits.max_tokens}")
        if pos.size:
            lo, hi = int(pos.min()), int(pos.max())
            _need(lo >= 0 and hi < t, "positions", f"must be in [0, {t}) for {t} input_ids, got range [{lo}, {hi}]")
    k = request.top_k
    _need(isinstance(k, (int, np.integer)) and not isinstance(k, bool), "top_k", f"expected an int, got {type(k).__name__}")
    _need(0 <= k <= limits.max_top_k, "top_k", f"must be in [0, {limits.max_top_k}], got {k}")
    if vocab is not None:
        _need(k <= vocab, "top_k", f"must be <= the vocab size {vocab}, got {k}")
    _need(request.logprobs_dtype in LOGPROB_DTYPES, "logprobs_dtype", f"expected one of {LOGPROB_DTYPES}, got {request.logprobs_dtype!r}")
    if request.target_ids is not None:
        _need(pos is not None, "target_ids", "needs positions to score them at")
        _check_ids(request.target_ids, "target_ids", pos.shape[0], vocab)
    sm = request.sequence_mask
    if sm is not None:
        _need(isinstance(sm, np.ndarray) and sm.dtype == np.bool_, "sequence_mask", f"expected a bool NumPy array, got {getattr(sm, 'dtype', type(sm).__name__)}")
        _need(sm.shape == (t,), "sequence_mask", f"expected shape ({t},) like input_ids, got {sm.shape}")
        _need(not bool(sm[0]), "sequence_mask", "position 0 cannot be scored: nothing predicts the first token")
    _need(isinstance(request.relation, (bool, np.bool_)), "relation", f"expected a bool, got {type(request.relation).__name__}")
    if request.relation:
        _need(n_img >= 1, "relation", "needs at least one image")
        _need(request.relation_dtype in RELATION_DTYPES, "relation_dtype", f"expected one of {RELATION_DTYPES}, got {request.relation_dtype!r}")
    wants_rows = pos is not None and pos.size > 0 and (k > 0 or request.target_ids is not None)
    _need(
        wants_rows or sm is not None or request.relation,
        "positions",
        "nothing to compute: give positions with top_k > 0 or target_ids, a sequence_mask, or relation=True",
    )
    _need(isinstance(request.request_id, str) and len(request.request_id) <= 256, "request_id", "expected a str of at most 256 characters")


# ----------------------------------------------------------------------------------------------
# npz codec for the HTTP ingress (and anywhere pickle is not welcome). Scalars and strings go into a
# JSON "__meta__" entry; arrays are stored as they are; `allow_pickle=False` on the way in.

_REQ_ARRAYS = ("input_ids", "positions", "pixel_values", "target_ids", "sequence_mask")
_REQ_META = ("version", "top_k", "logprobs_dtype", "relation", "relation_dtype", "request_id")
_RESP_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs", "relation")


def _pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    payload = {k: v for k, v in arrays.items() if v is not None}
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **payload)
    return buf.getvalue()


def _unpack(data: bytes, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - any decoding failure is the body's fault
        raise TeacherRequestError("body", f"not a valid npz-encoded {what}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise TeacherRequestError("body", f"__meta__ of the {what} must be a JSON object")
    return meta, arrays


def encode_request(req: ScoreRequest) -> bytes:
    meta = {k: getattr(req, k) for k in _REQ_META}
    meta.update(top_k=int(req.top_k), relation=bool(req.relation), num_images=len(req.images))
    arrays = {k: getattr(req, k) for k in _REQ_ARRAYS}
    arrays.update({f"image_{i}": np.frombuffer(bytes(b), dtype=np.uint8) for i, b in enumerate(req.images)})
    return _pack(meta, arrays)


def decode_request(data: bytes) -> ScoreRequest:
    """The request an npz body encodes (not yet validated: call `validate`)."""
    meta, arrays = _unpack(data, "request")
    n_img = meta.pop("num_images", 0)
    unknown = set(meta) - set(_REQ_META)
    if unknown:
        raise TeacherRequestError(sorted(unknown)[0], "unknown request field (or an array sent as metadata)")
    if not isinstance(n_img, int) or not 0 <= n_img <= 1024:
        raise TeacherRequestError("images", f"num_images must be a small non-negative int, got {n_img!r}")
    try:
        images = tuple(arrays.pop(f"image_{i}").tobytes() for i in range(int(n_img)))
    except KeyError as e:
        raise TeacherRequestError("images", f"num_images is {n_img} but {e.args[0]} is missing") from None
    extra = set(arrays) - set(_REQ_ARRAYS)
    if extra:
        raise TeacherRequestError(sorted(extra)[0], "unknown request array")
    if "input_ids" not in arrays:
        raise TeacherRequestError("input_ids", "missing")
    return ScoreRequest(images=images, **arrays, **meta)


def encode_response(resp: ScoreResponse) -> bytes:
    meta = {
        "version": resp.version,
        "model_id": resp.model_id,
        "tokenizer_hash": resp.tokenizer_hash,
        "request_id": resp.request_id,
        "sequence_logprob": resp.sequence_logprob,
    }
    return _pack(meta, {k: getattr(resp, k) for k in _RESP_ARRAYS})


def decode_response(data: bytes) -> ScoreResponse:
    meta, arrays = _unpack(data, "response")
    return ScoreResponse(**meta, **{k: arrays.get(k) for k in _RESP_ARRAYS})


def response_nbytes(resp: ScoreResponse) -> dict[str, int]:
    """Serialized size with pickle protocol 5, buffers out of band (Ray adds its own framing on top).

    {"total", "buffers" (out-of-band buffers: none for a packed response), "pickle" (everything else,
    for a packed response the payload included)}.
    """
    import pickle

    bufs: list = []
    head = pickle.dumps(resp, protocol=5, buffer_callback=bufs.append)
    body = sum(memoryview(b).nbytes for b in bufs)
    return {"total": len(head) + body, "buffers": body, "pickle": len(head)}
