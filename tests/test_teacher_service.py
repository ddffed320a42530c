"""The teacher service on a real local Ray: one app deployed by the CLI, shared by every test here.

The app is deployed by `python -m teacher_service deploy` in a subprocess that exits before the
tests run, so every test also shows that the app outlives the driver that deployed it. Tests run
in file order; the replica-kill test is last but one (its replacement replica serves the last one).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher_service.client import TeacherClient
from teacher_service.errors import TeacherOverloadedError, TeacherRequestError
from teacher_service.identity import model_id, tokenizer_hash
from teacher_service.protocol import make_request
from teacher_service.testing import reference_scores, sample_requests, save_tiny_teacher

APP = "test-teacher"
TOKEN = "test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def _cli(*args, address, timeout=180, env=None):
    env = dict(os.environ, RAY_ADDRESS=address, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "teacher_service", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(checkpoint dir, in-process model, processor): the reference every answer is checked against."""
    from student.model.loading import load_teacher

    path = save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")
    model, processor = load_teacher(path)
    return path, model, processor


@pytest.fixture(scope="module")
def service(ray_cluster, teacher):
    """Deploy with the CLI (small queues so overload is easy to reach; HTTP on a free local port)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:  # the HTTP ingress needs a proxy, chosen when Serve starts: restart a proxy-less Serve
        running = _get_global_client()
        if str(getattr(running.http_config.location, "value", running.http_config.location)) not in ("HeadOnly", "EveryNode"):
            serve.shutdown()
    except Exception:
        pass
    port = _free_port()
    r = _cli("deploy", "--model", str(teacher[0]), "--name", APP, "--max-ongoing-requests", "8",
             "--max-queued-requests", "8", "--max-tokens", "256", "--max-batch-tokens", "2048",
             "--http", "--http-port", str(port), address=ray_cluster, env={"TEACHER_HTTP_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    yield {"address": ray_cluster, "info": out["info"], "url": out["http"]}
    from teacher_service.app import shutdown

    shutdown(APP)


@pytest.fixture(scope="module")
def client(service, teacher):
    path, _, processor = teacher
    return TeacherClient(APP, timeout_s=60, retries=4, backoff_s=0.2,
                         expect_model_id=model_id(path), expect_tokenizer_hash=tokenizer_hash(processor))


def _assert_matches(resp, ref, k):
    """Top-k sets equal, fp32 log-probs / tail / targets / sequence within 1e-5 of the in-process forward."""
    v, i = torch.tensor(ref["logprobs"]).topk(k, -1)
    assert resp.topk_logprobs.dtype == np.float32 and resp.topk_ids.dtype == np.int32
    assert [set(a) for a in resp.topk_ids] == [set(b) for b in i.numpy()]
    assert np.abs(resp.topk_logprobs - v.numpy()).max() <= 1e-5
    assert np.abs(resp.tail_logmass - torch.log1p(-v.exp().sum(-1)).numpy()).max() <= 1e-5
    assert np.abs(resp.target_logprobs - ref["targets"]).max() <= 1e-5
    assert abs(resp.sequence_logprob - ref["sequence"]) <= 1e-5


def test_cli_deployed_app_outlives_its_driver(service, teacher):
    r = _cli("status", "--name", APP, address=service["address"])
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert st["status"] == "RUNNING"
    assert st["deployments"]["TeacherDeployment"]["replicas"] == {"RUNNING": 1}
    assert st["info"]["model_id"] == model_id(teacher[0])
    assert service["info"]["tokenizer_hash"] == tokenizer_hash(teacher[2])


def test_topk_and_sequence_logprobs_equal_in_process_forward(client, teacher):
    _, model, processor = teacher
    reqs = sample_requests(processor, 4, logprobs_dtype="float32", seed=1)
    reqs[1] = sample_requests(processor, 1, logprobs_dtype="float32", encoded_images=False, seed=2)[0]  # pixels
    before = client.server_stats()
    for req, resp in zip(reqs, client.score_many(reqs)):
        assert resp.request_id == req.request_id
        _assert_matches(resp, reference_scores(model, processor, req), k=64)
    after = client.server_stats()
    assert after["answered"] - before["answered"] == 4
    assert after["rows"] - before["rows"] == sum(len(r.positions) + int(r.sequence_mask.sum()) for r in reqs)
    # The wire default: fp16 log-probs, same ids.
    half = client.score(sample_requests(processor, 1, seed=1)[0])
    assert half.topk_logprobs.dtype == np.float16 and half.topk_logprobs.shape == (len(reqs[0].positions), 64)


def test_relation_matrix_equals_one_from_full_logits(client, teacher):
    _, model, processor = teacher
    req = sample_requests(processor, 1, relation=True, seed=3)[0]
    ref = torch.tensor(reference_scores(model, processor, req)["visual_logits"])  # [1, 36, V]
    want = (ref @ ref.transpose(-1, -2)).numpy()
    resp = client.score(req)
    assert resp.relation.shape == (1, 36, 36) and resp.relation.dtype == np.float32
    assert np.abs(resp.relation - want).max() <= 1e-5 * np.abs(want).max()
    scaled = client.score(make_request(req.input_ids, images=req.images, relation=True, relation_dtype="float16"))
    assert scaled.relation.dtype == np.float16 and scaled.topk_ids is None
    cos = (scaled.relation.astype(np.float64) * want).sum() / np.linalg.norm(scaled.relation.astype(np.float64)) / np.linalg.norm(want)
    assert cos > 1 - 1e-4


def test_malformed_requests_name_the_field_and_the_replica_keeps_serving(client, teacher):
    processor = teacher[2]
    good = sample_requests(processor, 1, seed=4)[0]
    bad = {
        "positions": make_request(good.input_ids, images=good.images, positions=[0, good.num_tokens]),
        "input_ids": make_request(good.input_ids[good.input_ids != processor.tokenizer.image_token_id][:20],
                                  images=good.images, positions=[3]),  # image tokens missing
        "images[0]": make_request(good.input_ids, images=[b"not a png"], positions=[3]),
        "top_k": make_request(good.input_ids, images=good.images, positions=[3], top_k=5000),
    }
    long = np.concatenate([good.input_ids, np.full(300, 10, np.int32)])
    bad["input_ids "] = make_request(long, images=good.images, positions=[3])  # over --max-tokens 256
    before = client.server_stats()["rejected"]
    for field, req in bad.items():
        with pytest.raises(TeacherRequestError) as e:
            client.score(req)
        assert e.value.field == field.strip(), str(e.value)
    assert "exceed the limit of 256" in str(e.value)
    assert client.server_stats()["rejected"] - before == len(bad)
    assert client.score(good).topk_ids.shape == (len(good.positions), 64)
    answered = client.server_stats()["answered"]
    with pytest.raises(TeacherRequestError) as e:  # in a list, the bad one fails alone
        client.score_many([good, bad["positions"], good])
    assert e.value.field == "positions" and client.server_stats()["answered"] - answered == 2


DRIVER = textwrap.dedent("""
    import json, pickle, sys, time
    from pathlib import Path
    import numpy as np, ray
    from teacher_service.client import TeacherClient

    job, seed, n = Path(sys.argv[1]), int(sys.argv[2]), 3
    reqs, refs = pickle.loads((job / f"job-{seed}.pkl").read_bytes())
    ray.init(address="auto", log_to_driver=False)
    client = TeacherClient("%s")
    client.info()
    (job / f"ready-{seed}").touch()
    while len(list(job.glob("ready-*"))) < n:  # start scoring together
        time.sleep(0.05)
    worst, same_sets = 0.0, True
    for _ in range(2):
        for resp, (ids, lp, seq) in zip(client.score_many(reqs), refs):
            same_sets &= [set(a) for a in resp.topk_ids] == [set(b) for b in ids]
            worst = max(worst, float(np.abs(resp.topk_logprobs - lp).max()), abs(resp.sequence_logprob - seq))
    print(json.dumps({"seed": seed, "worst": worst, "same_sets": bool(same_sets), "calls": client.stats()["calls"]}))
""" % APP)


def test_three_drivers_score_concurrently(service, teacher, client, tmp_path):
    """Three separate drivers (jobs) on the cluster find the app by name and get their own answers."""
    import pickle

    _, model, processor = teacher
    for seed in (11, 12, 13):  # each driver gets different requests and their in-process answers
        reqs = sample_requests(processor, 6, logprobs_dtype="float32", seed=seed)
        refs = []
        for r in reqs:
            ref = reference_scores(model, processor, r)
            v, i = torch.tensor(ref["logprobs"]).topk(64, -1)
            refs.append((i.numpy(), v.numpy(), ref["sequence"]))
        (tmp_path / f"job-{seed}.pkl").write_bytes(pickle.dumps((reqs, refs)))
    before = client.server_stats()["answered"]
    env = dict(os.environ, RAY_ADDRESS=service["address"], OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(seed)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (11, 12, 13)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        res = json.loads(out.strip().splitlines()[-1])
        assert res["same_sets"] and res["worst"] <= 1e-5 and res["calls"] == 12
    assert client.server_stats()["answered"] - before == 3 * 12


def test_full_queue_is_a_clear_overload_error_and_retries_absorb_it(client, teacher):
    import asyncio

    reqs = sample_requests(teacher[2], 8, seed=5) * 5  # 40 at once; the app takes 8 running + 8 queued per caller

    async def flood(c):
        return await asyncio.gather(*(c.ascore(r) for r in reqs), return_exceptions=True)

    impatient = TeacherClient(APP, retries=0)
    out = asyncio.run(flood(impatient))
    overloaded = [x for x in out if isinstance(x, TeacherOverloadedError)]
    assert overloaded and "overloaded after 1 attempt" in str(overloaded[0])
    assert all(isinstance(x, TeacherOverloadedError) or x.topk_ids is not None for x in out)
    assert impatient.stats()["errors"] == len(overloaded)
    patient = TeacherClient(APP, retries=6, backoff_s=0.1)
    assert all(x.topk_ids is not None for x in asyncio.run(flood(patient)))
    assert patient.stats()["retries"] >= 1 and patient.stats()["errors"] == 0


def test_http_ingress_speaks_npz_behind_a_bearer_token(service, client, teacher):
    from teacher_service.http_ingress import HTTPTeacherClient

    url = service["url"]
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as e:
        HTTPTeacherClient(url, token="wrong-token-0123456789").info()
    assert e.value.code == 401
    http = HTTPTeacherClient(url, token=TOKEN)
    assert http.info().model_id == service["info"]["model_id"]
    req = sample_requests(teacher[2], 1, logprobs_dtype="float32", seed=6)[0]
    a, b = http.score(req), client.score(req)
    np.testing.assert_array_equal(np.sort(a.topk_ids, 1), np.sort(b.topk_ids, 1))
    assert np.abs(a.topk_logprobs - b.topk_logprobs).max() <= 1e-5
    with pytest.raises(TeacherRequestError) as e:
        http.score(make_request(req.input_ids, images=req.images, positions=[10_000]))
    assert e.value.field == "positions"


def test_killed_replica_mid_stream_every_request_is_answered(client, teacher):
    import ray

    _, model, processor = teacher
    reqs = sample_requests(processor, 8, logprobs_dtype="float32", seed=7) * 2  # 16: the replica's capacity
    refs = [reference_scores(model, processor, r) for r in reqs[:8]] * 2
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"SERVE_REPLICA::{APP}#" in a["name"]]
    assert len(replicas) == 1
    answers, errors = [], []

    def stream():
        try:
            for _ in range(4):
                answers.append(client.score_many(reqs))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    retries_before = client.stats()["retries"]
    t = threading.Thread(target=stream)
    t.start()
    while not answers:
        time.sleep(0.01)
    time.sleep(0.1)  # into the next round: requests are running on the replica now
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    t.join(timeout=240)
    assert not errors and len(answers) == 4
    for batch in answers:
        for resp, ref in zip(batch, refs):
            _assert_matches(resp, ref, k=64)
    # Requests running on the killed replica fail with ActorDiedError: the client retried them. (Requests
    # still being routed are re-routed by Serve itself.)
    assert client.stats()["retries"] > retries_before


def test_cli_shutdown_deletes_the_app(service):
    from ray import serve

    r = _cli("shutdown", "--name", APP, address=service["address"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["deleted"] == [f"{APP}-http", APP]
    assert APP not in serve.status().applications
