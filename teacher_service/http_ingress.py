"""Optional HTTP ingress: the same protocol as npz bodies, behind a bearer token, on localhost by default.

(Named http_ingress, not http, so it can never shadow the standard library's `http` package.)

    POST {route_prefix}/v1/score   body: encode_request(...)   -> 200 encode_response(...)
    GET  {route_prefix}/v1/info    -> 200 JSON TeacherInfo

Every call needs `Authorization: Bearer <token>`. The ingress stores only the token's SHA-256, so the
token never appears in the Serve config or dashboard. Errors are JSON {"error", "field"?}: 400 for a
bad request (the field is named), 401 without a valid token, 413 for a body over the limit, 503 with
Retry-After when the teacher's queue is full or no replica is up. Bodies are never unpickled.

The ingress is a separate Serve app ("<name>-http") calling the teacher app through its handle, so
handle callers and HTTP callers share the same replicas and batches.
"""

import hashlib
import hmac
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from teacher_service.errors import (
    TeacherInternalError,
    TeacherOverloadedError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from teacher_service.protocol import (
    Limits,
    ScoreRequest,
    ScoreResponse,
    TeacherInfo,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

__all__ = ["HTTPConfig", "TeacherHTTPIngress", "build_http_app", "HTTPTeacherClient", "TOKEN_ENV", "NPZ_MEDIA_TYPE"]

TOKEN_ENV = "TEACHER_HTTP_TOKEN"
NPZ_MEDIA_TYPE = "application/x-npz"


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class HTTPConfig:
    """Where the proxy listens and which token it accepts. host defaults to loopback on purpose."""

    token: str
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/teacher"

    def __post_init__(self) -> None:
        if not self.token or len(self.token) < 16:
            raise ValueError(f"HTTP ingress needs a bearer token of at least 16 characters (set {TOKEN_ENV})")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    def __repr__(self) -> str:  # never print the token
        return f"HTTPConfig(host={self.host!r}, port={self.port}, route_prefix={self.route_prefix!r}, token=***)"


api = FastAPI(title="teacher", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message} if field is None else {"error": message, "field": field}
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment(name="TeacherHTTPIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class TeacherHTTPIngress:
    def __init__(self, app_name: str, token_sha256: str, max_body_bytes: int):
        self._app_name = app_name
        self._token_sha256 = token_sha256
        self._max_body = int(max_body_bytes)
        self._handle = None

    def _teacher(self):
        if self._handle is None:
            self._handle = serve.get_app_handle(self._app_name)
        return self._handle

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(_sha256(token.strip()), self._token_sha256)

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None when it exceeds the limit (checked before and while reading)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/v1/info")
    async def info(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        info: TeacherInfo = await self._teacher().get_info.remote()
        return JSONResponse(info.to_dict())

    @api.post("/v1/score")
    async def score(self, request: Request):
        from teacher_service.client import classify_error

        if not self._authorized(request):
            return _error(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        body = await self._body(request)
        if body is None:
            return _error(413, f"request body exceeds {self._max_body} bytes", field="body")
        try:
            req = decode_request(body)
            resp: ScoreResponse = await self._teacher().remote(req)
        except Exception as e:  # noqa: BLE001 - mapped to a status code below
            try:
                err = e if isinstance(e, TeacherRequestError) else classify_error(e)
            except Exception as other:  # noqa: BLE001 - e.g. a malformed body that slipped past decoding
                return _error(400, f"{type(other).__name__}: {other}", field="body")
            if isinstance(err, TeacherRequestError):
                return _error(400, str(err), field=err.field)
            if isinstance(err, TeacherInternalError):
                return _error(500, str(err))
            if isinstance(err, TeacherOverloadedError):
                return _error(503, f"teacher overloaded: {err.message}", headers={"Retry-After": "1"})
            return _error(503, f"teacher unavailable: {err}", headers={"Retry-After": "1"})
        return Response(encode_response(resp), media_type=NPZ_MEDIA_TYPE)


def build_http_app(app_name: str, http: HTTPConfig, limits: Limits = Limits()):
    return TeacherHTTPIngress.bind(app_name, _sha256(http.token), limits.max_body_bytes)


class HTTPTeacherClient:
    """A tiny stdlib client for the ingress (no Ray needed on the caller's side)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout_s = timeout_s

    def _call(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", NPZ_MEDIA_TYPE)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw.decode("utf-8", "replace")}
            if e.code == 400:
                raise TeacherRequestError(body.get("field", "request"), body.get("error", "")) from None
            if e.code == 503 and "overloaded" in body.get("error", ""):
                raise TeacherOverloadedError(body["error"]) from None
            if e.code == 503:
                raise TeacherUnavailableError(body.get("error", "")) from None
            if e.code == 500:
                raise TeacherInternalError(body.get("error", "")) from None
            raise

    def info(self) -> TeacherInfo:
        return TeacherInfo.from_dict(json.loads(self._call("/v1/info")))

    def score(self, request: ScoreRequest) -> ScoreResponse:
        return decode_response(self._call("/v1/score", encode_request(request)))
