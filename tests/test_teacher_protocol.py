"""Teacher service pieces that need no cluster: validation, npz codec, scoring math, identity, config."""
import io
import sys

import numpy as np
import pytest
import torch

from teacher_service.app import ServiceConfig, placement_resources
from teacher_service.backends import available_backends, create_backend
from teacher_service.client import TeacherClient
from teacher_service.errors import TeacherRequestError, WrongTeacherError
from teacher_service.identity import model_id, tokenizer_hash
from teacher_service.protocol import (
    PROTOCOL_VERSION,
    Limits,
    ScoreRequest,
    ScoreResponse,
    TeacherInfo,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    make_request,
    positions_from_mask,
    validate,
)
from teacher_service.scoring import score_rows

INFO = TeacherInfo(model_id="m@0", tokenizer_hash="tok-0", backend="hf", vocab_size=100, image_token_id=2,
                   image_seq_length=4, image_shape=(3, 8, 8), pad_token_id=0, dtype="float32", device="cpu")
LIMITS = Limits(max_tokens=32, max_images=2, max_top_k=16)


def _ids(n_images=1, text=6):
    return np.array([5] + [2] * (4 * n_images) + list(range(10, 10 + text)), np.int32)


def _req(**kw):
    ids = kw.pop("input_ids", _ids())
    pv = kw.pop("pixel_values", np.zeros((1, 3, 8, 8), np.float32))
    kw.setdefault("positions", np.arange(5, len(ids) - 1))
    kw.setdefault("top_k", 8)
    return make_request(ids, pixel_values=pv, **kw)


def _field(req, limits=LIMITS, info=INFO):
    with pytest.raises(TeacherRequestError) as e:
        validate(req, limits, info)
    return e.value.field


def test_valid_request_passes_and_bad_ones_name_their_field():
    validate(_req(target_ids=np.arange(10, 15), sequence_mask=np.r_[np.zeros(5, bool), np.ones(6, bool)]), LIMITS, INFO)
    assert _field(_req(positions=[0, 11])) == "positions"  # out of range for 11 tokens
    assert _field(_req(input_ids=_ids(text=40))) == "input_ids"  # over max_tokens
    assert _field(_req(input_ids=_ids(n_images=2))) == "input_ids"  # 8 image tokens for 1 image
    assert _field(_req(input_ids=np.r_[_ids(), 100].astype(np.int32))) == "input_ids"  # id >= vocab
    assert _field(_req(top_k=17)) == "top_k"
    assert _field(_req(target_ids=[1, 2])) == "target_ids"  # 2 targets for 5 positions
    assert _field(_req(sequence_mask=np.ones(11, bool))) == "sequence_mask"  # position 0 is unpredictable
    assert _field(_req(pixel_values=np.zeros((1, 3, 16, 16), np.float32))) == "pixel_values"
    assert _field(_req(pixel_values=np.full((1, 3, 8, 8), np.nan, np.float32))) == "pixel_values"
    assert _field(_req(input_ids=_ids(n_images=0), pixel_values=None, relation=True, positions=None)) == "relation"
    assert _field(_req(positions=None, top_k=0)) == "positions"  # nothing to compute
    assert _field(_req(images=[b""], pixel_values=None)) == "images[0]"
    raw = ScoreRequest(input_ids=_ids().astype(np.int64), positions=np.array([5], np.int32))
    assert _field(raw) == "input_ids"  # int64 on the wire is refused, not silently cast
    assert _field(ScoreRequest(input_ids=_ids(), positions=np.array([5], np.int32), version=PROTOCOL_VERSION - 1)) == "version"
    with pytest.raises(TeacherRequestError, match="input_ids: expected integer ids"):
        make_request(np.zeros(3, np.float32))


def test_positions_from_mask_is_row_major_order():
    m = np.array([False, True, False, True, True])
    assert positions_from_mask(m).tolist() == [1, 3, 4]
    assert positions_from_mask(m).dtype == np.int32
    req = make_request(np.arange(5), position_mask=torch.tensor(m))
    assert req.positions.tolist() == [1, 3, 4]


def test_npz_roundtrip_and_no_pickle():
    req = _req(images=(), target_ids=np.arange(10, 15), relation=True, request_id="r1")
    back = decode_request(encode_request(req))
    for f in ("input_ids", "positions", "pixel_values", "target_ids"):
        np.testing.assert_array_equal(getattr(back, f), getattr(req, f))
        assert getattr(back, f).dtype == getattr(req, f).dtype
    assert (back.top_k, back.relation, back.request_id, back.images) == (8, True, "r1", ())
    png = make_request(_ids(), images=[b"\x89PNG fake"], positions=[5])
    assert decode_request(encode_request(png)).images == (b"\x89PNG fake",)

    resp = ScoreResponse(model_id="m", tokenizer_hash="t", topk_ids=np.ones((2, 3), np.int32),
                         topk_logprobs=np.zeros((2, 3), np.float16), tail_logmass=np.zeros(2, np.float32),
                         sequence_logprob=-1.5)
    out = decode_response(encode_response(resp))
    assert out.sequence_logprob == -1.5 and out.topk_logprobs.dtype == np.float16 and out.relation is None

    buf = io.BytesIO()
    np.savez(buf, input_ids=np.array([object()], dtype=object), __meta__=np.frombuffer(b"{}", np.uint8))
    with pytest.raises(TeacherRequestError, match="body: not a valid npz"):
        decode_request(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, input_ids=np.arange(3, dtype=np.int32), __meta__=np.frombuffer(b'{"input_ids": 1}', np.uint8))
    with pytest.raises(TeacherRequestError) as e:
        decode_request(buf.getvalue())
    assert e.value.field == "input_ids"


def test_response_pickles_packed_into_one_payload():
    """Protocol 2: a response crosses the object store as one payload; arrays come back as equal views."""
    import pickle

    rng = np.random.default_rng(0)
    n, k = 28, 64
    resp = ScoreResponse(model_id="m@0", tokenizer_hash="tok-0", request_id="r7",
                         topk_ids=rng.integers(0, 1000, (n, k)).astype(np.int32),
                         topk_logprobs=rng.standard_normal((n, k)).astype(np.float16),
                         tail_logmass=rng.standard_normal(n).astype(np.float32),
                         target_logprobs=rng.standard_normal(n).astype(np.float32), sequence_logprob=-3.25,
                         relation=rng.standard_normal((1, 3, 3)).astype(np.float16))
    bufs: list = []
    data = pickle.dumps(resp, protocol=5, buffer_callback=bufs.append)
    assert bufs == []  # no per-array out-of-band buffers (Ray frames each one at ~160 B)
    arrays = n * k * 6 + n * 8 + 9 * 2
    assert arrays < len(data) < arrays + 200, len(data)
    back = pickle.loads(data)
    for f in ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprobs", "relation"):
        a, b = getattr(resp, f), getattr(back, f)
        assert a.dtype == b.dtype and a.shape == b.shape and not b.flags.writeable
        np.testing.assert_array_equal(a, b)
    assert (back.model_id, back.tokenizer_hash, back.request_id, back.sequence_logprob, back.version) == \
        ("m@0", "tok-0", "r7", -3.25, PROTOCOL_VERSION)
    empty = pickle.loads(pickle.dumps(ScoreResponse(model_id="m", tokenizer_hash="t", topk_ids=np.zeros((0, k), np.int32),
                                                    topk_logprobs=np.zeros((0, k), np.float16)), protocol=5))
    assert empty.topk_ids.shape == (0, k) and empty.tail_logmass is None and empty.sequence_logprob is None


def test_score_rows_matches_fp32_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    logits[:, 40:] = 100.0  # a padded vocab: these columns must not take part
    targets = torch.randint(0, 40, (7,), generator=g)
    s = score_rows(logits, lambda x: x, vocab_size=40, top_k=5, targets=targets, logprobs_dtype=np.float32, chunk_rows=3)
    ref = torch.log_softmax(logits[:, :40], -1)
    v, i = ref.topk(5, -1)
    np.testing.assert_allclose(s.topk_logprobs, v.numpy(), atol=1e-6)
    assert [set(a) for a in s.topk_ids] == [set(b) for b in i.numpy()]
    np.testing.assert_allclose(s.tail_logmass, torch.log1p(-v.exp().sum(-1)).numpy(), atol=1e-5)
    np.testing.assert_allclose(s.target_logprobs, ref.gather(1, targets[:, None])[:, 0].numpy(), atol=1e-6)
    assert s.topk_ids.dtype == np.int32 and s.tail_logmass.dtype == np.float32

    full = score_rows(logits, lambda x: x, vocab_size=40, top_k=40)
    assert np.isneginf(full.tail_logmass).all() and full.topk_logprobs.dtype == np.float16
    empty = score_rows(logits[:0], lambda x: x, vocab_size=40, top_k=5, targets=targets[:0])
    assert empty.topk_ids.shape == (0, 5) and empty.target_logprobs.shape == (0,)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        score_rows(logits, lambda x: x, vocab_size=60, top_k=5)


def test_identity_hashes(tmp_path, shapes_tokenizer):
    from actors.shapes.tokenizer import build_tokenizer
    from student.model import build_processor

    h = tokenizer_hash(shapes_tokenizer)
    assert h == tokenizer_hash(build_processor(shapes_tokenizer))  # a processor hashes as its tokenizer
    shapes_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "tok")) == h
    assert tokenizer_hash(build_tokenizer(vocab_size=300)) != h

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"a" * 100)
    first = model_id(d, name="teacher")
    assert first.startswith("teacher@") and model_id(d, name="teacher") == first
    (d / "model.safetensors").write_bytes(b"a" * 99 + b"b")
    assert model_id(d, name="teacher") != first


def test_service_config_and_placement():
    cfg = ServiceConfig(model="/m")
    assert placement_resources(cfg, {"CPU": 8}) == {}  # auto: no teacher pool on this cluster
    assert placement_resources(cfg, {"CPU": 8, "teacher_gpu": 2}) == {"teacher_gpu": 0.01}
    gpu = ServiceConfig(model="/m", num_gpus=0.5, placement="require")
    assert placement_resources(gpu, {"CPU": 8}) == {"teacher_gpu": 0.5}
    assert placement_resources(ServiceConfig(model="/m", placement="off"), {"teacher_gpu": 1}) == {}
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ServiceConfig(model="/m", max_batch_tokens=100, limits=Limits(max_tokens=200))
    with pytest.raises(ValueError, match="autoscale"):
        ServiceConfig(model="/m", autoscale=(3, 1))
    with pytest.raises(ValueError, match="max_queued_requests"):
        ServiceConfig(model="/m", max_queued_requests=0)


def test_backend_registry_is_lazy():
    assert {"hf", "vllm"} <= set(available_backends())
    assert "vllm" not in sys.modules  # listing backends imports none of them
    with pytest.raises(ValueError, match="unknown teacher backend 'nope'.*'vllm'"):
        create_backend("nope", "/m")


def test_client_rejects_a_wrong_teacher():
    resp = ScoreResponse(model_id="teacher@1", tokenizer_hash="tok-a")
    assert TeacherClient(expect_model_id="teacher@1", expect_tokenizer_hash="tok-a")._check(resp) is resp
    with pytest.raises(WrongTeacherError, match="tokenizer_hash is 'tok-a', expected 'tok-b'"):
        TeacherClient(expect_tokenizer_hash="tok-b")._check(resp)
    with pytest.raises(WrongTeacherError, match="model_id"):
        TeacherClient(expect_model_id="teacher@2")._check(resp)
