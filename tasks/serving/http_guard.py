"""What stands between the network and the model in the Bento service: request hygiene, admission under overload,
bearer auth, one-line logs for client errors, truthful OpenAPI, and route-bounded metric labels.

- `RequestGuard` (ASGI middleware, the outermost of service.py's): every `/classify` request is checked before
  BentoML reads it: only `POST` with `Content-Type: application/json` (or a form with a `texts` field, which
  BentoML also reads), UTF-8, and no `Content-Encoding` (else 415),
  a body of at most `max_body_bytes` (else 413, by its Content-Length or while it streams in). Then admission: at
  most `max_in_flight` requests inside the server at once, up to `max_queued` more waiting in FIFO order for at most
  `queue_timeout_seconds`; what cannot be served in time gets 503 with `Retry-After` and a JSON message saying the
  server is at capacity, logged as one line. A 503 from BentoML's own dispatcher is rewritten the same way. Other
  paths: unknown ones get a JSON 404 that names the API.
- `BearerTokenAuth`: `Authorization: Bearer <token>` (the scheme in any case, RFC 7235) for everything but health,
  metrics and the docs.
- `one_line_client_errors()`: a logging filter that turns BentoML's traceback for a 4xx (and its overload 503) into
  one line with the request id.
- `openapi_document()`: BentoML's generated document, completed with the 400/401/413/415/503 bodies it really
  sends and the bearer scheme (so Swagger UI can authorize), without the README BentoML embeds as description.
- `bound_metric_labels()`: BentoML labels its HTTP metrics with the raw request path, so every unknown path became
  a new series (5,000 paths: /metrics 127 KB -> 21 MB). Paths that match no route are labelled `/unmatched`.

Standard library only, besides the serving settings (it ships in the Bento, bentofile.yaml `include`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tasks.serving.asgi import ASGIApp, Message, Receive, Scope, Send
from tasks.serving.settings import AdmissionEnv

logger = logging.getLogger("textclf.serving")
logger.setLevel(logging.INFO)

JSON_HEADERS = [(b"content-type", b"application/json")]
UNMATCHED_PATH = "/unmatched"  # the metric label of every path that matches no route
# Paths a client may GET without a token: probes, scrapers, the Swagger UI at "/" and what it loads.
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json", "/static_content/")


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


# A request's cost budget, documented in the README and the OpenAPI description, enforced (400) before the forward
# pass; batch scoring through the endpoint sends requests within it. A model token covers at least one character, so
# characters bound the tokens a request makes the server read (tokenizing is the cost of long texts: one request of
# 64 x 20,000 characters tied the server up for 3-6 s); 128,000 characters is 64 news articles of 2,000.
MAX_TEXTS_PER_REQUEST = 64
MAX_TEXT_CHARS = 20_000
MAX_REQUEST_CHARS = 128_000


@dataclass(frozen=True)
class ServingLimits:
    """Request limits and admission; the defaults are those of tasks/serving/settings.py `AdmissionEnv` (chosen by
    measurement: bench/serving_load.py, README "Serving")."""

    max_body_bytes: int = AdmissionEnv.model_fields["max_body_bytes"].default
    max_in_flight: int = AdmissionEnv.model_fields["max_in_flight"].default
    max_queued: int = AdmissionEnv.model_fields["max_queued"].default
    queue_timeout_seconds: float = AdmissionEnv.model_fields["queue_timeout_seconds"].default
    retry_after_seconds: int = 1
    # The request's cost budget, named in the 413 message and the OpenAPI description.
    max_texts: int = MAX_TEXTS_PER_REQUEST
    max_text_chars: int = MAX_TEXT_CHARS
    max_request_chars: int = MAX_REQUEST_CHARS

    @classmethod
    def from_settings(cls, settings: AdmissionEnv) -> ServingLimits:
        """The admission part of the serving settings (TEXTCLF_MAX_BODY_BYTES, TEXTCLF_MAX_IN_FLIGHT,
        TEXTCLF_MAX_QUEUED, TEXTCLF_QUEUE_TIMEOUT_SECONDS)."""
        return cls(
            max_body_bytes=settings.max_body_bytes,
            max_in_flight=settings.max_in_flight,
            max_queued=settings.max_queued,
            queue_timeout_seconds=settings.queue_timeout_seconds,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingLimits:
        """The same from the process environment (or `environ`); a bad value raises a ValueError naming the
        variable (the server does not start)."""
        return cls.from_settings(AdmissionEnv.load(environ))


# ----------------------------------------------------------------------------------------------------------
# Small ASGI helpers
# ----------------------------------------------------------------------------------------------------------


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*JSON_HEADERS, *headers]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


async def drain(receive: Receive) -> None:
    """Read the rest of a request body we refused (so the connection can be reused), without keeping it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")  # BentoML reads `texts` from a form too


def media_type_error(content_type: str | None, content_encoding: str | None) -> str | None:
    """Why this Content-Type / Content-Encoding cannot be read as a classify request, or None when it can: JSON
    (the documented body), or a form whose `texts` field holds a JSON list, which BentoML also reads."""
    if content_encoding and content_encoding.strip().lower() not in ("identity", ""):
        return (
            f"Content-Encoding {content_encoding!r} is not supported: send the JSON body uncompressed "
            f"(no Content-Encoding header)."
        )
    media, _, params = (content_type or "application/json").partition(";")
    media = media.strip().lower()
    parameters = {}
    for param in params.split(";"):
        key, _, value = param.partition("=")
        parameters[key.strip().lower()] = value.strip().strip('"')
    if media not in ("application/json", *FORM_TYPES):
        return (
            f"Content-Type {media!r} is not supported: send a JSON body with "
            f'Content-Type: application/json, like {{"texts": ["first text", "second text"]}}.'
        )
    if media == "multipart/form-data" and not parameters.get("boundary"):
        return (
            "Content-Type 'multipart/form-data' without a boundary cannot be read: send JSON with "
            "Content-Type: application/json (or a form with its boundary, as HTTP clients make it)."
        )
    charset = parameters.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        return f"charset {charset!r} is not supported: send the body as UTF-8 (charset=utf-8)."
    return None


# ----------------------------------------------------------------------------------------------------------
# Admission
# ----------------------------------------------------------------------------------------------------------


class AtCapacity(Exception):
    """No room for this request within the queue timeout (or the queue is full)."""


class Admission:
    """At most `max_in_flight` holders at once; up to `max_queued` waiters, served first come, first served, each
    for at most `timeout` seconds. Plain asyncio on the server's event loop (one loop per worker)."""

    def __init__(self, max_in_flight: int, max_queued: int, timeout: float):
        self.max_in_flight, self.max_queued, self.timeout = max_in_flight, max_queued, timeout
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one (the common case: no task, no timer)."""
        while self.waiters and self.waiters[0].done():  # expired or abandoned at the head of the queue
            self.waiters.popleft()
        if self.in_flight < self.max_in_flight and not self.waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if len(self.waiters) >= self.max_queued:
            raise AtCapacity("queue full")
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_later(self.timeout, self._expire, waiter)  # one timer, no extra task per waiter
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # the slot came as the client left: pass it on
            elif not waiter.done():
                waiter.cancel()
            raise
        finally:
            timer.cancel()

    @staticmethod
    def _expire(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(AtCapacity("queue timeout"))

    def release(self) -> None:
        while self.waiters:  # hand the slot straight to the oldest live waiter
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


# ----------------------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware; see the module docstring. `api_paths` are the POST APIs it guards and admits."""

    def __init__(self, app: ASGIApp, limits: ServingLimits, api_paths: tuple[str, ...] = ("/classify",)):
        self.app, self.limits, self.api_paths = app, limits, frozenset(api_paths)
        self.admission = Admission(limits.max_in_flight, limits.max_queued, limits.queue_timeout_seconds)
        self.rejected = 0
        self._last_rejection_log = 0.0

    def _at_capacity_body(self) -> dict[str, Any]:
        return {
            "error": (
                f"The server is at capacity ({self.limits.max_in_flight} requests in progress and "
                f"{len(self.admission.waiters)} waiting): retry after {self.limits.retry_after_seconds} s, "
                f"or send fewer requests at once."
            )
        }

    async def _reject_at_capacity(self, send: Send, reason: str) -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_rejection_log >= 1.0:  # one line a second at most, however many are refused
            logger.warning(
                "503 at capacity (%s): %d requests refused so far, %d in progress, %d waiting",
                reason,
                self.rejected,
                self.admission.in_flight,
                len(self.admission.waiters),
            )
            self._last_rejection_log = now
        await send_json(
            send, 503, self._at_capacity_body(), [(b"retry-after", str(self.limits.retry_after_seconds).encode())]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("textclf.path", scope.get("path", ""))  # the real path (see bound_metric_labels)
        if path in self.api_paths:
            await self._guarded_api(scope, receive, send)
        elif path in ("/docs.json", "/schema.json") and scope.get("method") == "GET":
            await self._openapi(scope, receive, send)
        elif "textclf.path" not in scope and ("app" not in scope or is_routed(scope)):
            await self.app(scope, receive, send)
        else:
            await drain(receive)
            await send_json(
                send,
                404,
                {
                    "error": f"No such path {path!r}: the API is POST /classify; its "
                    f"documentation is at /docs.json (Swagger UI at /)."
                },
            )

    async def _guarded_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await drain(receive)
            await send_json(
                send,
                405,
                {"error": f"{scope.get('method')} is not allowed on {scope['path']}: send POST with a JSON body."},
                [(b"allow", b"POST")],
            )
            return
        problem = media_type_error(header(scope, b"content-type"), header(scope, b"content-encoding"))
        if problem:
            await drain(receive)
            await send_json(send, 415, {"error": problem})
            return
        limit = self.limits.max_body_bytes
        too_large = {
            "error": f"The request body is larger than {limit} bytes: send at most {self.limits.max_texts} texts of at "
            f"most {self.limits.max_text_chars} characters each, splitting larger jobs into several requests."
        }
        declared = header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await drain(receive)
            await send_json(send, 413, too_large)
            return
        # Read the whole body here (bounded), before admission: a slow or oversized upload never holds a slot.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await drain(receive) if message.get("more_body", False) else None
                await send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # Wait for admission, unless the client goes away first: a request nobody waits for anymore leaves the queue
        # (after a load, the server would otherwise work off the abandoned queue before a new request's turn).
        disconnect: asyncio.Future[Message] | None = None
        if not self.admission.try_acquire():
            disconnect = await self._wait_for_admission(receive, send)
            if disconnect is None:
                return  # refused (answered 503) or the client left
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # after the body: wait for the disconnect, as the server would
            return await (disconnect if disconnect is not None else receive())

        rewrite = False

        async def send_checked(message: Message) -> None:
            nonlocal rewrite
            if message["type"] == "http.response.start" and message["status"] == 503:
                rewrite = True  # BentoML's dispatcher shed it: answer as the admission would
                return
            if rewrite:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    await self._reject_at_capacity(send, "dispatcher")
                return
            await send(message)

        try:
            await self.app(scope, replay, send_checked)
        finally:
            self.admission.release()
            if disconnect is not None:
                disconnect.cancel()

    async def _wait_for_admission(self, receive: Receive, send: Send) -> asyncio.Future[Message] | None:
        """Wait in the queue for a slot; None when refused (503 sent) or when the client left first. Otherwise the
        pending `receive()` that watched for the disconnect, which the request goes on using."""
        admitted = asyncio.ensure_future(self.admission.acquire())
        disconnect = asyncio.ensure_future(receive())
        await asyncio.wait({admitted, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not admitted.done():
            admitted.cancel()
            with contextlib.suppress(asyncio.CancelledError, AtCapacity):
                await admitted
            if not admitted.cancelled() and admitted.exception() is None:
                self.admission.release()  # admitted at the same moment the client left
            return None
        if admitted.exception() is not None:
            disconnect.cancel()
            await self._reject_at_capacity(send, str(admitted.exception()))
            return None
        return disconnect

    async def _openapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict[str, Any] = {}
        parts: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(parts)
        if start.get("status") == 200:
            try:
                body = json.dumps(openapi_document(json.loads(body), self.limits)).encode()
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                logger.warning("could not complete the OpenAPI document (%s); serving BentoML's as it is", error)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send(
            {
                "type": "http.response.start",
                "status": start.get("status", 500),
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------
# Auth
# ----------------------------------------------------------------------------------------------------------


class BearerTokenAuth:
    """When a token is configured, every path but health, metrics and the docs needs `Authorization: Bearer
    <token>`; the scheme is case-insensitive (RFC 7235), the token compared in constant time."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path != "/" and not path.startswith(OPEN_PATHS):  # "/" is the docs UI
            scheme, _, given = (header(scope, b"authorization") or "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.expected):
                await drain(receive)
                await send_json(
                    send,
                    401,
                    {"error": "Missing or wrong bearer token: send Authorization: Bearer <token>."},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------


class OneLineClientErrors(logging.Filter):
    """BentoML logs every rejected request with its traceback (`Exception on /classify [POST]`); for client errors
    (validation, a 4xx) and for its overload 503 that is noise: keep one line naming the status and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not record.exc_info[1]:
            return True
        error = record.exc_info[1]
        status = _client_status(error)
        if status is None:
            return True  # a real server error keeps its traceback
        count = getattr(error, "error_count", None)
        reason = f"{count()} validation error(s)" if callable(count) else str(error).splitlines()[0][:200]
        record.msg = f"{record.getMessage()}: {status} {type(error).__name__}: {reason}"
        record.args, record.exc_info, record.exc_text = (), None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's error, not the server's
        return True


def _client_status(error: BaseException) -> int | None:
    if type(error).__name__ == "ValidationError":
        return 400
    code = getattr(getattr(error, "error_code", None), "value", None)
    if isinstance(code, int) and (400 <= code < 500 or code == 503):
        return code
    return None


def one_line_client_errors() -> None:
    """Install the filter on the logger BentoML reports request errors with (idempotent)."""
    target = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, OneLineClientErrors) for f in target.filters):
        target.addFilter(OneLineClientErrors())


# ----------------------------------------------------------------------------------------------------------
# OpenAPI
# ----------------------------------------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was wrong and how to fix it."}},
}
VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "How many fields failed validation."},
        "detail": {
            "type": "array",
            "description": "One entry per failed field (pydantic's error list).",
            "items": {
                "type": "object",
                "properties": {
                    "type": {"type": "string"},
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}


def openapi_document(document: dict[str, Any], limits: ServingLimits) -> dict[str, Any]:
    """BentoML's OpenAPI document with the error answers the service really gives and the bearer scheme."""
    info = document.setdefault("info", {})
    info["description"] = (
        f'Text classification: POST /classify with {{"texts": [...]}} (1 to {limits.max_texts} texts, each with a '
        f"visible character and at most {limits.max_text_chars} characters, at most {limits.max_request_chars} "
        "characters in all). Each answer gives the label, "
        "its probability, every class's probability, whether the text was truncated, and the model version and "
        "runtime that answered. When the server has an API token, send Authorization: Bearer <token>."
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["ValidationError"] = VALIDATION_ERROR_SCHEMA
    schemas.pop("InvalidArgument", None)  # BentoML's, with `detail` as a string: not what it sends
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "Needed when the server runs with TEXTCLF_API_TOKEN; health, metrics and docs stay open.",
    }

    def error(description: str, schema: str = "Error", headers: dict[str, Any] | None = None) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
        if headers:
            answer["headers"] = headers
        return answer

    for item in document.get("paths", {}).values():
        operation = item.get("post")
        if not isinstance(operation, dict):
            continue
        responses = operation.setdefault("responses", {})
        for code in ("400", "404", "500"):
            responses.pop(code, None)  # BentoML's generic entries, replaced below
        responses["400"] = error(
            "The body is not valid: broken JSON, a missing or wrong field, a text that is "
            "blank or too long, too many texts or characters.",
            "ValidationError",
        )
        responses["401"] = error("Missing or wrong bearer token (only when the server has an API token).")
        responses["413"] = error(f"The body is larger than {limits.max_body_bytes} bytes.")
        responses["415"] = error(
            "The body cannot be read: a Content-Type other than application/json (or a form "
            "with its boundary), a charset other than UTF-8, or a Content-Encoding."
        )
        responses["503"] = error(
            "The server is at capacity: retry after the number of seconds in Retry-After.",
            headers={
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
        )
        operation["security"] = [{}, {"bearerAuth": []}]  # open unless the server has a token
    return document


# ----------------------------------------------------------------------------------------------------------
# Metric labels
# ----------------------------------------------------------------------------------------------------------


def route_table(app: Any) -> tuple[frozenset[str], tuple[str, ...]]:
    """The exact paths and the path prefixes (mounts, parametrised routes) the Starlette `app` routes."""
    cached = _ROUTES.get(id(app))
    if cached is None:
        exact: set[str] = set()
        prefixes: set[str] = set()
        for route in getattr(app, "routes", ()):
            path = getattr(route, "path", None)
            if not isinstance(path, str):
                continue
            if "{" in path or not hasattr(route, "endpoint"):  # a mount or a route with parameters
                prefixes.add(path.split("{", 1)[0].rstrip("/") + "/")
            else:
                exact.add(path or "/")
        cached = _ROUTES[id(app)] = (frozenset(exact), tuple(sorted(prefixes)))
    return cached


_ROUTES: dict[int, tuple[frozenset[str], tuple[str, ...]]] = {}


def is_routed(scope: Scope) -> bool:
    """Whether the request's path matches one of the server's routes (the Starlette app is `scope["app"]`)."""
    exact, prefixes = route_table(scope.get("app"))
    path = scope.get("path", "")
    return path in exact or path.startswith(prefixes)


def bound_metric_labels() -> None:
    """Make BentoML's HTTP metrics middleware (the outermost middleware, which labels every series with the raw
    request path) label the paths that match no route as `/unmatched`. BentoML 1.4 has no setting for it and runs
    that middleware outside every user middleware, so its class is wrapped once, in the server process. The real
    path stays in the scope as `textclf.path`, so RequestGuard's 404 still names it. Pinned BentoML (1.4.39); a test
    checks that thousands of unknown paths add no series."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    if getattr(RunnerTrafficMetricsMiddleware, "_textclf_bounded", False):
        return
    original = RunnerTrafficMetricsMiddleware.__call__

    async def labelled(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "http" and "app" in scope and not is_routed(scope):
            scope = dict(
                scope, path=UNMATCHED_PATH, raw_path=UNMATCHED_PATH.encode(), **{"textclf.path": scope.get("path", "")}
            )
        await original(self, scope, receive, send)

    setattr(RunnerTrafficMetricsMiddleware, "__call__", labelled)  # noqa: B010  (a method patched, on purpose)
    setattr(RunnerTrafficMetricsMiddleware, "_textclf_bounded", True)  # noqa: B010


# ----------------------------------------------------------------------------------------------------------
# BentoML's dispatcher after a load
# ----------------------------------------------------------------------------------------------------------


def forget_stale_batch_wait() -> None:
    """BentoML's adaptive batching learns `wait`, the mean time a batch's first request waited, and corks each new
    request for up to that long hoping for company. Under load the first request waits for the batch before it, so
    the learned wait becomes a whole batch's duration (~300 ms); once the load stops, every lone request is corked
    that long, records that wait again, and the mean decays only with traffic (single requests took ~300 ms instead
    of ~15 ms for over 6 minutes). A batch of one means the cork gathered nobody: then the learned waits are
    forgotten, so the next lone request goes straight through. Wrapped once per server process; pinned BentoML."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    if getattr(Optimizer, "_textclf_forgets", False):
        return
    original = Optimizer.log_outbound

    def log_outbound(self: Any, n: int, wait: float, duration: float) -> None:
        if n == 1 and self.wait > 0:
            self.o_stat = collections.deque(
                ((size, took, 0.0) for size, took, _ in self.o_stat), maxlen=self.o_stat.maxlen
            )
            self.wait = 0
            wait = 0.0
        original(self, n, wait, duration)  # returns nothing (BentoML 1.4.39)

    setattr(Optimizer, "log_outbound", log_outbound)  # noqa: B010  (a method patched, on purpose)
    setattr(Optimizer, "_textclf_forgets", True)  # noqa: B010
