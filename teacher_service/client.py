"""The caller's side: find the teacher app by name on the current Ray cluster and score requests.

Several student runs (separate drivers, Train workers, Ray Data actors) each build a TeacherClient
and share one endpoint. Calls go through a Serve handle, so NumPy payloads travel through the object
store. Failures a caller cannot fix by changing the request (replica died, queue full, timeout, app
briefly missing) are retried with exponential backoff; a bad request (TeacherRequestError) and a
wrong teacher (WrongTeacherError) never are.

A retry re-sends the same request: scoring is a pure function of the request, so a request that
was answered by a replica that died before replying is simply computed again.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque

import numpy as np

from teacher_service.app import DEFAULT_APP_NAME
from teacher_service.errors import (
    TeacherError,
    TeacherInternalError,
    TeacherOverloadedError,
    TeacherRequestError,
    TeacherTimeoutError,
    TeacherUnavailableError,
    WrongTeacherError,
)
from teacher_service.protocol import ScoreRequest, ScoreResponse, TeacherInfo

__all__ = ["TeacherClient", "classify_error"]

_LATENCY_WINDOW = 10_000  # latencies kept for the percentiles


def classify_error(e: BaseException) -> TeacherError:
    """The teacher-service error a handle exception stands for (re-raises the caller's own bugs).

    Ray re-raises a replica's exception as a RayTaskError that also subclasses the original and keeps
    it in `.cause`; Serve raises BackPressureError at the caller when its queue is full; a dead
    replica surfaces as RayActorError / ActorDiedError / ActorUnavailableError.
    """
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import BackPressureError, RayServeException

    cause = getattr(e, "cause", None) or e
    if isinstance(cause, TeacherRequestError):
        return TeacherRequestError(cause.field, cause.reason)  # the clean original, without Ray's wrapper
    if isinstance(cause, TeacherError):
        return cause
    if isinstance(cause, BackPressureError):
        return TeacherOverloadedError(str(cause))
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return TeacherTimeoutError(f"no answer within the client's timeout ({type(e).__name__})")
    if isinstance(e, RayTaskError) and not isinstance(cause, RayError | RayServeException):
        return TeacherInternalError(f"{type(cause).__name__}: {cause}")
    if isinstance(e, RayError | RayServeException | ConnectionError):
        return TeacherUnavailableError(f"{type(cause).__name__}: {cause}")
    raise e  # not from Ray or the teacher: a bug on the caller's side


class TeacherClient:
    """Sync and async scoring against the Serve app `name`, with retries, backoff and latency stats.

    expect_model_id / expect_tokenizer_hash: every response is checked against them and a mismatch
    raises WrongTeacherError (a student must never learn from another tokenizer's ids).
    """

    def __init__(
        self,
        name: str = DEFAULT_APP_NAME,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        expect_model_id: str | None = None,
        expect_tokenizer_hash: str | None = None,
    ):
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"timeout_s must be > 0, retries and backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}")
        self.name = name
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.expect_model_id = expect_model_id
        self.expect_tokenizer_hash = expect_tokenizer_hash
        self._handle = None
        self._per_call: int | None = None
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._counts = {"calls": 0, "retries": 0, "errors": 0}

    # -- plumbing ----------------------------------------------------------------------------
    def _get_handle(self):
        if self._handle is None:
            import ray
            from ray import serve

            if not ray.is_initialized():
                ray.init(address="auto", log_to_driver=False)
            try:
                self._handle = serve.get_app_handle(self.name)
            except Exception as e:  # noqa: BLE001 - Serve says "does not exist" in several ways
                raise TeacherUnavailableError(f"no Serve app {self.name!r} on this Ray cluster: {e}") from None
        return self._handle

    def __getstate__(self):  # a client may be shipped to Ray actors; handles and locks are rebuilt there
        state = self.__dict__.copy()
        state.update(_handle=None, _lock=None, _latencies=deque(maxlen=_LATENCY_WINDOW), _counts=dict.fromkeys(self._counts, 0))
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with +-25% jitter, so callers that failed together do not retry together."""
        return self.backoff_s * (2**attempt) * random.uniform(0.75, 1.25)

    def _check(self, resp: ScoreResponse) -> ScoreResponse:
        if self.expect_model_id is not None and resp.model_id != self.expect_model_id:
            raise WrongTeacherError("model_id", self.expect_model_id, resp.model_id)
        if self.expect_tokenizer_hash is not None and resp.tokenizer_hash != self.expect_tokenizer_hash:
            raise WrongTeacherError("tokenizer_hash", self.expect_tokenizer_hash, resp.tokenizer_hash)
        return resp

    def _record(self, latency: float | None, retries: int, error: bool) -> None:
        with self._lock:
            self._counts["calls"] += 1
            self._counts["retries"] += retries
            self._counts["errors"] += int(error)
            if latency is not None:
                self._latencies.append(latency)

    def _failed(self, err: TeacherError, attempt: int) -> bool:
        """Whether to give up on `err` after `attempt` (0-based) attempts; drops the handle on unavailability."""
        if isinstance(err, TeacherUnavailableError):
            self._handle = None  # the app may have been redeployed: look it up again
        return isinstance(err, TeacherRequestError | WrongTeacherError | TeacherInternalError) or attempt >= self.retries

    @staticmethod
    def _final(err: TeacherError, attempts: int) -> TeacherError:
        if isinstance(err, TeacherOverloadedError | TeacherUnavailableError):
            return type(err)(err.message, attempts)
        return err

    def _call_sync(self, method: str | None, *args, record: bool = True):
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            response = None
            try:
                handle = self._get_handle()
                target = handle if method is None else getattr(handle, method)
                response = target.remote(*args)
                out = response.result(timeout_s=self.timeout_s)
                if isinstance(out, ScoreResponse):
                    self._check(out)
                if record:
                    self._record(time.perf_counter() - t0, attempt, False)
                return out
            except Exception as e:  # noqa: BLE001 - classified below
                err = classify_error(e)
                if isinstance(err, TeacherTimeoutError) and response is not None:
                    response.cancel()
                if self._failed(err, attempt):
                    if record:
                        self._record(None, attempt, True)
                    raise self._final(err, attempt + 1) from None
                time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    # -- public API --------------------------------------------------------------------------
    def info(self) -> TeacherInfo:
        """What the teacher serves (model id, tokenizer hash, vocab, image token, limits)."""
        info = self._call_sync("get_info", record=False)
        if self.expect_model_id is not None and info.model_id != self.expect_model_id:
            raise WrongTeacherError("model_id", self.expect_model_id, info.model_id)
        if self.expect_tokenizer_hash is not None and info.tokenizer_hash != self.expect_tokenizer_hash:
            raise WrongTeacherError("tokenizer_hash", self.expect_tokenizer_hash, info.tokenizer_hash)
        return info

    def score(self, request: ScoreRequest) -> ScoreResponse:
        """One request, blocking; retried with backoff on replica death, overload and timeouts."""
        return self._call_sync(None, request)

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Score a list: results in request order, far cheaper than one `score` per request.

        Requests travel in chunks of the teacher's `limits.max_requests_per_call`, one handle call per
        chunk, all chunks in flight at once, so a chunk reaches the replica's batch queue together.
        A chunk whose call fails (replica died, overload, timeout) is re-sent with backoff, as `score`
        retries; a request the teacher refuses raises its TeacherRequestError once every other request
        has finished (the first such error; the others are counted in stats()["errors"]).
        """
        if not requests:
            return []
        size = self._max_per_call()
        chunks = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        handle = self._get_handle()
        t0 = time.perf_counter()
        first = [handle.score_many.remote(c) for c in chunks]
        out: list[ScoreResponse] = []
        first_error: TeacherError | None = None
        for chunk, response in zip(chunks, first):
            try:
                answers, attempts = self._chunk(chunk, response)
            except TeacherError as e:  # the whole chunk failed for good
                self._record_many(None, len(chunk), errors=len(chunk))
                first_error = first_error or e
                out.extend([None] * len(chunk))  # type: ignore[list-item]
                continue
            latency = time.perf_counter() - t0
            for x in answers:
                if isinstance(x, ScoreResponse):
                    try:
                        x = self._check(x)
                    except WrongTeacherError as e:
                        x = e
                if isinstance(x, BaseException):
                    first_error = first_error or (x if isinstance(x, TeacherError) else TeacherInternalError(repr(x)))
                    x = None
                out.append(x)  # type: ignore[arg-type]
            self._record_many(latency, len(chunk), errors=sum(x is None for x in out[-len(chunk):]), retries=attempts)
        if first_error is not None:
            raise first_error
        return out

    def _max_per_call(self) -> int:
        if self._per_call is None:
            self._per_call = int(self._call_sync("get_info", record=False).limits.max_requests_per_call)
        return self._per_call

    def _chunk(self, chunk: list[ScoreRequest], response) -> tuple[list, int]:
        """(per-request answers or errors, retries) of one list call, re-sending it on retryable failures."""
        for attempt in range(self.retries + 1):
            try:
                if response is None:
                    response = self._get_handle().score_many.remote(chunk)
                return response.result(timeout_s=self.timeout_s), attempt
            except Exception as e:  # noqa: BLE001 - classified below
                err = classify_error(e)
                if isinstance(err, TeacherTimeoutError):
                    response.cancel()
                if self._failed(err, attempt):
                    raise self._final(err, attempt + 1) from None
                response = None
                time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def _record_many(self, latency: float | None, n: int, *, errors: int, retries: int = 0) -> None:
        with self._lock:
            self._counts["calls"] += n
            self._counts["retries"] += retries
            self._counts["errors"] += errors
            if latency is not None:
                self._latencies.extend([latency] * (n - errors))

    async def ascore(self, request: ScoreRequest) -> ScoreResponse:
        """`score` for async code (Ray Data async UDFs, asyncio drivers); never blocks the event loop."""
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                out = await asyncio.wait_for(self._get_handle().remote(request), self.timeout_s)
                self._check(out)
                self._record(time.perf_counter() - t0, attempt, False)
                return out
            except Exception as e:  # noqa: BLE001 - classified below
                err = classify_error(e)
                if self._failed(err, attempt):
                    self._record(None, attempt, True)
                    raise self._final(err, attempt + 1) from None
                await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def stats(self) -> dict:
        """Client-side, over scoring requests (not info calls): calls (requests), retries (re-sent
        calls), errors (requests that failed for good) and latency in seconds, p50 / p95 / mean over
        the last 10,000 answered requests (a score_many request's latency is its chunk's)."""
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64)
            out = dict(self._counts)
        if lat.size:
            out.update(latency_p50_s=float(np.percentile(lat, 50)), latency_p95_s=float(np.percentile(lat, 95)),
                       latency_mean_s=float(lat.mean()))
        else:
            out.update(latency_p50_s=None, latency_p95_s=None, latency_mean_s=None)
        return out

    def server_stats(self) -> dict:
        """Server-side counters summed over the live replicas (each counts since it started).

        Keys: requests, rejected, answered, rows (next-token distributions computed), tokens, batches,
        padded_tokens, forward_s, replicas, and peak_in_flight (the largest over replicas, not a sum).
        A replica that died took its counts with it.
        """
        per_replica = self._get_handle().broadcast("get_stats").results(timeout_s=self.timeout_s)
        total: dict = {}
        for s in per_replica:
            for k, v in s.items():
                if k.startswith("peak_"):
                    total[k] = max(total.get(k, 0), v)
                elif k not in ("pid", "uptime_s"):
                    total[k] = total.get(k, 0) + v
        return total
