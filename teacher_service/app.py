"""The Serve application: one frozen teacher that any number of student runs share.

Why a service: peers load the teacher next to the student on every GPU and run out of memory
(LLaVA-MoD issue #5 and many more). Here the teacher lives once, in its own pool (custom resource
`teacher_gpu`), and students reach it by app name through a handle (`TeacherClient`).

Per request the replica validates (a bad request fails alone with the field named, the replica keeps
serving), decodes images, and then joins a dynamic batch sized by *padded tokens* (`@serve.batch`
with a `batch_size_fn`), which runs as one padded forward in a worker thread so the event loop keeps
accepting requests (and health checks) while the model computes.

Queueing: a replica takes at most `max_ongoing_requests` requests; beyond that each caller's handle
queues up to `max_queued_requests` (Serve counts this per caller, so it bounds every student run's
backlog separately) and then raises Serve's BackPressureError, which `TeacherClient` turns into
retries with backoff and finally `TeacherOverloadedError`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ray import serve

from teacher_service.backends import create_backend
from teacher_service.errors import TeacherError, TeacherInternalError, TeacherRequestError
from teacher_service.protocol import Limits, ScoreRequest, ScoreResponse, TeacherInfo, make_request, validate

__all__ = [
    "DEPLOYMENT_NAME",
    "DEFAULT_APP_NAME",
    "PLACEMENT_RESOURCE",
    "ServiceConfig",
    "TeacherDeployment",
    "build_app",
    "deploy",
    "shutdown",
    "app_status",
    "placement_resources",
    "padded_tokens",
]

log = logging.getLogger(__name__)

DEFAULT_APP_NAME = "teacher"
DEPLOYMENT_NAME = "TeacherDeployment"
PLACEMENT_RESOURCE = "teacher_gpu"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `deploy` needs; the CLI fills it from flags.

    model: a local checkpoint directory, readable at the same path on every node that may host a
    replica. device / dtype / model_id / torch_threads / backend_options go to the backend.
    `autoscale=(min, max)` replaces `replicas`. http: an `http_ingress.HTTPConfig` to also expose the
    app over HTTP (off by default: handle-only, no proxy at all).
    """

    model: str
    name: str = DEFAULT_APP_NAME
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"
    model_id: str | None = None
    torch_threads: int | None = None
    backend_options: dict = field(default_factory=dict)
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 32.0  # autoscaling target per replica: about one full batch
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    placement: str = "auto"  # auto: use placement_resource when the cluster has it; require; off
    placement_resource: str = PLACEMENT_RESOURCE
    max_batch_tokens: int = 16384  # padded tokens (requests x longest sequence) per forward
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    limits: Limits = field(default_factory=Limits)
    health_check_period_s: float = 5.0
    warmup: bool = True
    env_vars: dict = field(default_factory=dict)  # extra env for replicas (e.g. OMP_NUM_THREADS)
    http: object | None = None  # http_ingress.HTTPConfig

    def __post_init__(self) -> None:
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"autoscale: expected 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}")
        elif self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if self.placement not in ("auto", "require", "off"):
            raise ValueError(f"placement: expected auto, require or off, got {self.placement!r}")
        if self.limits.max_tokens > self.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= limits.max_tokens ({self.limits.max_tokens}): "
                "a maximal request must fit one batch"
            )
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise ValueError(f"max_queued_requests: must be >= 1 (or -1: unbounded), got {self.max_queued_requests}")

    def backend_kwargs(self) -> dict:
        return dict(device=self.device, dtype=self.dtype, model_id=self.model_id, torch_threads=self.torch_threads,
                    **self.backend_options)


def padded_tokens(requests: list[ScoreRequest]) -> int:
    """The batch's cost: one padded [B, T_max] forward. Serve's batch_size_fn."""
    return len(requests) * max(r.num_tokens for r in requests)


def rows_scored(request: ScoreRequest) -> int:
    """Next-token distributions the request needed: its positions plus its sequence-mask tokens."""
    n = 0 if request.positions is None else int(request.positions.shape[0])
    return n + (0 if request.sequence_mask is None else int(request.sequence_mask.sum()))


@serve.deployment(name=DEPLOYMENT_NAME)
class TeacherDeployment:
    """A replica: a backend plus validation, per-request preparation and token-sized batching."""

    def __init__(self, cfg: ServiceConfig):
        self.backend = create_backend(cfg.backend, cfg.model, **cfg.backend_kwargs())
        self.limits = cfg.limits
        self.info: TeacherInfo = dataclasses.replace(self.backend.info, limits=cfg.limits)
        self.score_batch.set_max_batch_size(int(cfg.max_batch_tokens))
        self.score_batch.set_batch_wait_timeout_s(float(cfg.batch_wait_timeout_s))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
        # Counters of this replica's lifetime; TeacherClient.server_stats() sums them over replicas.
        self._stats = {"requests": 0, "rejected": 0, "answered": 0, "rows": 0, "tokens": 0, "batches": 0,
                       "padded_tokens": 0, "forward_s": 0.0, "peak_in_flight": 0}
        self._in_flight = 0  # requests inside this replica now (queued for a batch or computing)
        self._started = time.time()
        if cfg.warmup:
            self._warmup()
        log.info("teacher replica ready: %s", self.info)

    def _warmup(self) -> None:
        """One small forward so the first real request does not pay for lazy initialisation."""
        info = self.info
        if info.image_shape is None:
            ids = np.full(2, info.pad_token_id, np.int32)
            pv = None
        else:
            ids = np.full(info.image_seq_length + 2, info.pad_token_id, np.int32)
            ids[1:-1] = info.image_token_id
            pv = np.zeros((1, *info.image_shape), np.float32)
        self.backend.score([make_request(ids, positions=[len(ids) - 1], pixel_values=pv, top_k=1)])

    async def __call__(self, request: ScoreRequest) -> ScoreResponse:
        return await self._answer(request, prepared=False)

    async def _answer(self, request: ScoreRequest, *, prepared: bool) -> ScoreResponse:
        """Validate and prepare the request (unless score_many already did), then join a batch."""
        self._stats["requests"] += 1
        self._in_flight += 1  # the replica's memory bound: Serve admits at most max_ongoing_requests calls
        self._stats["peak_in_flight"] = max(self._stats["peak_in_flight"], self._in_flight)
        try:
            if not prepared:
                try:
                    validate(request, self.limits, self.info)
                    if request.images:  # decoding is per request: a corrupt image fails only its own request
                        request = await asyncio.to_thread(self.backend.prepare, request, self.limits)
                    else:
                        request = self.backend.prepare(request, self.limits)
                except Exception:
                    self._stats["rejected"] += 1
                    raise
            return await self.score_batch(request)
        finally:
            self._in_flight -= 1

    async def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse | TeacherError]:
        """Many requests in one call: one round trip instead of one per request, and they all reach
        the batch queue together. Per-request outcome: its response, or its error (returned, not
        raised, so one bad request does not void the others)."""
        n = len(requests) if isinstance(requests, list) else -1
        if not 0 <= n <= self.limits.max_requests_per_call:
            raise TeacherRequestError("requests", f"expected a list of at most {self.limits.max_requests_per_call} requests, got {n if n >= 0 else type(requests).__name__}")
        # Validate and decode the list first, all in one thread hop: requests that finish decoding one by
        # one trickle into the batch queue and, past batch_wait_timeout_s, split one list into several
        # half-full forwards (measured: 16 requests per forward for lists of 32). A request that fails
        # here goes on unprepared, so _answer raises (and counts) its error exactly as a single call would.
        prepared = await asyncio.to_thread(lambda: [self._prepare_or_none(r) for r in requests])
        out = await asyncio.gather(*(self._answer(r if p is None else p, prepared=p is not None)
                                     for r, p in zip(requests, prepared)), return_exceptions=True)
        return [x if isinstance(x, ScoreResponse | TeacherError) else TeacherInternalError(f"{type(x).__name__}: {x}") for x in out]

    def _prepare_or_none(self, request: ScoreRequest) -> ScoreRequest | None:
        try:
            validate(request, self.limits, self.info)
            return self.backend.prepare(request, self.limits)
        except Exception:  # noqa: BLE001 - _answer raises it again for this request alone
            return None

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.01, batch_size_fn=padded_tokens)
    async def score_batch(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, self.backend.score, requests)
        s = self._stats
        s["batches"] += 1
        s["answered"] += len(requests)
        s["rows"] += sum(rows_scored(r) for r in requests)
        s["tokens"] += sum(r.num_tokens for r in requests)
        s["padded_tokens"] += padded_tokens(requests)
        s["forward_s"] += time.perf_counter() - t0
        return out

    def get_info(self) -> TeacherInfo:
        return self.info

    def get_stats(self) -> dict:
        """This replica's counters since it started (requests received/rejected/answered, rows, ...;
        in_flight / peak_in_flight: requests inside the replica now / at most at once, each request
        of a score_many call counted)."""
        return dict(self._stats, in_flight=self._in_flight, replicas=1, pid=os.getpid(),
                    uptime_s=time.time() - self._started)

    def __del__(self):
        try:
            self._pool.shutdown(wait=False)
            self.backend.close()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


def placement_resources(cfg: ServiceConfig, cluster_resources: dict | None = None) -> dict:
    """{cfg.placement_resource: amount} or {}.

    "auto" (default): only when the cluster advertises the resource, so a teacher pool is used when
    it exists and a laptop or CI box (no such resource) still runs the service. "require" always
    asks for it (replicas stay pending until such a node joins); "off" never does. The amount is
    the replica's GPUs (so fractional GPU packing works), or 0.01 for a CPU teacher in that pool.
    """
    if cfg.placement == "off":
        return {}
    if cfg.placement == "auto":
        if cluster_resources is None:
            import ray

            cluster_resources = ray.cluster_resources() if ray.is_initialized() else {}
        if cfg.placement_resource not in cluster_resources:
            return {}
    return {cfg.placement_resource: cfg.num_gpus if cfg.num_gpus > 0 else 0.01}


def build_app(cfg: ServiceConfig, cluster_resources: dict | None = None):
    """The bound Serve application (run it with route_prefix=None: handle-only)."""
    cfg = dataclasses.replace(cfg, model=str(Path(cfg.model).resolve()), http=None)  # no token in Serve's config
    actor_options: dict = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    resources = placement_resources(cfg, cluster_resources)
    if resources:
        actor_options["resources"] = resources
    if cfg.env_vars:
        actor_options["runtime_env"] = {"env_vars": {k: str(v) for k, v in cfg.env_vars.items()}}
    opts: dict = dict(
        name=DEPLOYMENT_NAME,
        ray_actor_options=actor_options,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        health_check_period_s=cfg.health_check_period_s,
        # one access-log line per request drowns a training run's console; errors still log
        logging_config={"enable_access_log": False},
    )
    if cfg.autoscale is not None:
        lo, hi = cfg.autoscale
        opts["num_replicas"] = "auto"
        opts["autoscaling_config"] = {
            "min_replicas": lo,
            "initial_replicas": max(lo, 1),
            "max_replicas": hi,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = cfg.replicas
    return TeacherDeployment.options(**opts).bind(cfg)


def _start_serve(http) -> None:
    """Start Serve (no proxy unless `http`), or check that the running one can do what we ask."""
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        client = _get_global_client()
    except RayServeException:
        client = None
    if client is None:
        if http is None:
            serve.start(proxy_location="Disabled")
        else:
            serve.start(proxy_location="HeadOnly", http_options={"host": http.host, "port": http.port})
        return
    if http is None:
        return
    cur = client.http_config
    location = str(getattr(cur.location, "value", cur.location))
    if location not in ("HeadOnly", "EveryNode") or (cur.host, cur.port) != (http.host, http.port):
        raise RuntimeError(
            f"Serve already runs on this cluster with proxy {location} at {cur.host}:{cur.port}; the HTTP ingress "
            f"needs a proxy at {http.host}:{http.port}. Deploy without HTTP, use that host/port, or restart Serve "
            "(`serve shutdown`, which stops every Serve app on the cluster)."
        )


def deploy(cfg: ServiceConfig):
    """Run the teacher app (and its HTTP ingress when cfg.http is set); returns its handle once healthy.

    Connects to RAY_ADDRESS (or starts a local Ray) if this process has no Ray yet. The app is owned
    by Serve's controller, not by this process: it keeps serving after the caller exits, for as long
    as the Ray cluster lives (a local Ray started by `ray.init()` dies with its driver, taking the app
    with it; the CLI therefore starts a standalone `ray start --head` cluster when none exists).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    _start_serve(cfg.http)
    handle = serve.run(build_app(cfg), name=cfg.name, route_prefix=None)
    if cfg.http is not None:
        from teacher_service.http_ingress import build_http_app

        serve.run(build_http_app(cfg.name, cfg.http, cfg.limits), name=f"{cfg.name}-http", route_prefix=cfg.http.route_prefix)
    return handle


def shutdown(name: str = DEFAULT_APP_NAME) -> list[str]:
    """Delete the teacher app and its HTTP ingress app (if any); returns the names deleted."""
    apps = serve.status().applications
    gone = [n for n in (f"{name}-http", name) if n in apps]
    for n in gone:
        serve.delete(n)
    return gone


def app_status(name: str = DEFAULT_APP_NAME) -> dict | None:
    """{"name", "status", "message", "deployments": {name: {"status", "replicas": {state: n}}}} or None."""
    app = serve.status().applications.get(name)
    if app is None:
        return None
    deps = {
        d: {"status": str(getattr(s.status, "value", s.status)), "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()}}
        for d, s in app.deployments.items()
    }
    return {"name": name, "status": str(getattr(app.status, "value", app.status)), "message": app.message, "deployments": deps}
