"""The HTTP API (Bottle) and the web process's entry point.

``create_app`` builds the WSGI app from its collaborators (tests call it directly). The module-level
``app`` builds itself from the environment on its first request, so ``gunicorn app:app`` and friends
work while importing this module stays free of side effects. ``python app.py`` serves it on gevent
and supervises the worker.
"""

if __name__ == "__main__":  # the entry point patches before anything else is imported
    from gevent import monkey

    monkey.patch_all()

import json
import logging
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gevent.queue
from bottle import Bottle, HTTPError, HTTPResponse, request, response

from auth import KeyChecker, presented_key
from http_errors import (
    SecureJSONMiddleware,
    StartResponse,
    WSGIApp,
    error_payload,
    error_response,
    json_response,
)
from metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from metrics import Metrics, exposition
from storage import (
    IdempotencyConflict,
    Job,
    JobQueue,
    Queued,
    Status,
    StatusStore,
    StorageUnavailable,
    now_ms,
)
from streaming import RelayServer, completion_as_events
from validation import BodyError, parse_chat_completion
from views import status_json, webhook_json
from waiters import Waiters
from webhook_safety import check_url_literal
from webhooks import owe_webhook

log = logging.getLogger("llm_proxy.api")
T = TypeVar("T")

OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.json"
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
RETRY_AFTER_UNAVAILABLE = "5"
RETRY_AFTER_QUEUE_FULL = "10"
RETRY_AFTER_POLL = "1"


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    max_body_bytes: int
    max_queue: int
    webhook_allow_private: bool = False
    sync_wait_max: float = 25.0
    result_ttl: float = 3600.0
    cancel_wait: float = 5.0
    """How long a DELETE waits for the worker to abort a running call before answering 202."""
    metrics_public: bool = False
    stream_hold: float = 3.0
    """How long a streamed answer holds back its 200 waiting for the first event."""
    stream_keepalive: float = 10.0


def new_request_id() -> str:
    return "chatreq_" + secrets.token_urlsafe(18)  # 144 random bits


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes without reading them all."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.strip():
        try:
            length = int(declared)
        except ValueError:
            raise BodyError([{"path": "", "message": "invalid Content-Length"}]) from None
        if length > limit:
            raise BodyTooLarge
        return bytes(stream.read(length)) if length > 0 else b""
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)


def pending_entry(queued: Queued) -> dict[str, Any]:
    return {
        "status": Status.PENDING.value,
        "request_json": queued.body_json,
        "owner": queued.owner,
        "timestamp": queued.submitted_at,
        "attempts": 0,
    }


def header(name: str) -> str | None:
    """A request header as the WSGI server gave it (latin-1). Bottle's own accessor re-decodes
    values as UTF-8 and raises on bytes that are not, which must never become a 500."""
    value = request.environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value if isinstance(value, str) else None


def preferred_wait(prefer: str | None, cap: float) -> float:
    """Seconds asked for by ``Prefer: wait`` / ``Prefer: wait=N`` (RFC 7240), capped; 0 if not asked.
    As the RFC says, a preference that cannot be understood is ignored."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.split(";")[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not value:
            return cap
        try:
            seconds = float(value)
        except ValueError:
            return 0.0
        return min(seconds, cap) if 0 <= seconds < float("inf") else 0.0
    return 0.0


def final_answer(request_id: str, entry: dict[str, Any], headers: dict[str, str]) -> HTTPResponse:
    """What a wait-mode client gets: the upstream's chat.completion unchanged, or an OpenAI-shaped
    error with the status the SDK maps to the right exception, told not to retry (we did)."""
    if entry["status"] == Status.CANCELLED.value:
        kept = {name: value for name, value in headers.items() if name != "Location"}
        return error_response(409, "The request was cancelled.", "request_cancelled", headers=kept)
    if entry["status"] == Status.COMPLETED.value:
        reply = HTTPResponse(body=entry["response_json"], status=200)
        reply.content_type = "application/json"
        for name, value in headers.items():
            if name != "Location":
                reply.set_header(name, value)
        return reply
    error = entry.get("error") or {}
    upstream = error.get("upstream_status")
    if isinstance(upstream, int) and 400 <= upstream <= 599:
        status = upstream
    else:
        status = 504 if error.get("type") == "timeout" else 502
    payload = error_object(entry)
    kept = {name: value for name, value in headers.items() if name != "Location"}
    return json_response(status, {"error": payload}, headers={**kept, "x-should-retry": "false"})


def error_object(entry: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-shaped error of a failed request: the upstream's own when it sent one."""
    error = entry.get("error") or {}
    upstream = error.get("upstream_error")
    if isinstance(upstream, dict):
        return upstream
    return {
        "message": error.get("message", "the request failed"),
        "type": error.get("type", "upstream_error"),
        "param": None,
        "code": error.get("code"),
    }


def event_stream(headers: dict[str, str], body: Iterable[bytes]) -> HTTPResponse:
    reply = HTTPResponse(body=body, status=200)
    reply.set_header("Content-Type", "text/event-stream")
    for name, value in headers.items():
        if name != "Location":
            reply.set_header(name, value)
    return reply


def _next_event(sink: Any, timeout: float) -> bytes | None:
    """The next relayed line; b"" if none came within ``timeout``; None when the relay ended."""
    try:
        item: bytes | None = sink.get(timeout=timeout)
    except gevent.queue.Empty:
        return b""
    return item


def _quietly(action: Callable[[str], T], request_id: str) -> T | None:
    try:
        return action(request_id)
    except StorageUnavailable:
        return None


def wait_seconds(raw: str | None, cap: float) -> float | HTTPResponse:
    """The ``wait`` of a long-poll: seconds, capped; a 400 when it is not a number >= 0."""
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        return error_response(
            400, "wait must be a number of seconds >= 0", "invalid_request_error", param="wait"
        )
    return min(seconds, cap)


def create_app(
    *,
    queue: JobQueue,
    statuses: StatusStore,
    keys: KeyChecker,
    settings: ApiSettings,
    notify: Callable[[], None] = lambda: None,
    waiters: Waiters | None = None,
    signal_cancel: Callable[[str], None] = lambda request_id: None,
    relays: RelayServer | None = None,
    outbox: JobQueue | None = None,
    metrics: Metrics | None = None,
    render_metrics: Callable[[], bytes] | None = None,
) -> WSGIApp:
    waiters = Waiters() if waiters is None else waiters
    # Exceptions propagate to SecureJSONMiddleware, which logs them once and answers a JSON 500
    # (with catchall, Bottle would also write the traceback to wsgi.errors).
    api = Bottle()
    api.config["catchall"] = False

    def authenticate() -> str | HTTPResponse:
        owner = keys.owner(presented_key(header("X-API-Key"), header("Authorization")))
        if owner is None:
            return error_response(
                401,
                "Invalid or missing API key. Send it in the X-API-Key header "
                "or as 'Authorization: Bearer <key>'.",
                "authentication_error",
                headers={"WWW-Authenticate": 'Bearer realm="llm-proxy"'},
            )
        return owner

    def not_found() -> HTTPResponse:
        return error_response(404, "Request not found", "request_not_found")

    def unavailable(exc: StorageUnavailable) -> HTTPResponse:
        log.error("storage unavailable: %s", exc)
        return error_response(
            503,
            "The request could not be stored right now; retry shortly.",
            "service_unavailable",
            headers={"Retry-After": RETRY_AFTER_UNAVAILABLE},
        )

    openapi = OPENAPI_PATH.read_bytes()
    streaming: set[str] = set()
    render = render_metrics or exposition(queue.counts)

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/metrics")
    def prometheus() -> HTTPResponse:
        if not settings.metrics_public:
            owner = authenticate()
            if isinstance(owner, HTTPResponse):
                return owner
        try:
            text = render()
        except StorageUnavailable as exc:
            return unavailable(exc)
        reply = HTTPResponse(body=text, status=200)
        reply.set_header("Content-Type", METRICS_CONTENT_TYPE)
        return reply

    @api.get("/openapi.json")
    def openapi_document() -> HTTPResponse:
        reply = HTTPResponse(body=openapi, status=200)
        reply.content_type = "application/json"
        return reply

    @api.post("/v1/chat/completions")
    def submit() -> HTTPResponse:
        owner = authenticate()
        if isinstance(owner, HTTPResponse):
            return owner
        try:
            body = parse_chat_completion(read_body(request.environ, settings.max_body_bytes))
        except BodyTooLarge:
            return error_response(
                413, f"The request body exceeds {settings.max_body_bytes} bytes.", "request_too_large"
            )
        except BodyError as exc:
            return error_response(400, "Invalid request body", "validation_error", details=exc.details)
        webhook_url = body.get("webhookUrl")
        if webhook_url and not settings.webhook_allow_private:
            problem = check_url_literal(webhook_url)
            if problem:
                detail = {"path": "webhookUrl", "message": f"not an allowed webhook destination: {problem}"}
                return error_response(400, "Invalid request body", "validation_error", details=[detail])
        key = header("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            return error_response(
                400,
                "Idempotency-Key must be 1 to 255 printable ASCII characters.",
                "invalid_request_error",
                param="Idempotency-Key",
            )
        wait = preferred_wait(header("Prefer"), settings.sync_wait_max)
        streamed = bool(body.get("stream")) and wait > 0 and relays is not None
        job = Job(request_id=new_request_id(), body=body, owner=owner, submitted_at=now_ms(), relay=streamed)
        sink = relays.open(job.request_id) if streamed and relays is not None else None
        try:
            return accept(job, key, wait, sink)
        finally:
            # Unless an event stream now owns the sink (it closes it when it ends).
            if sink is not None and relays is not None and job.request_id not in streaming:
                relays.close_sink(job.request_id)

    def accept(job: Job, key: str | None, wait: float, sink: Any) -> HTTPResponse:
        try:
            if queue.counts()[0] >= settings.max_queue:
                return error_response(
                    429,
                    f"The queue is full ({settings.max_queue} requests waiting); retry later.",
                    "queue_full",
                    headers={"Retry-After": RETRY_AFTER_QUEUE_FULL},
                )
            if key:
                request_id = queue.put_once(job, key)
            else:
                queue.put(job)
                request_id = job.request_id
        except IdempotencyConflict as exc:
            return error_response(
                422,
                "This Idempotency-Key was already used with a different request body.",
                "idempotency_error",
                request_id=exc.request_id,
            )
        except StorageUnavailable as exc:
            return unavailable(exc)
        replayed = request_id != job.request_id
        if not replayed:
            notify()
        headers = {"Location": f"/v1/chat/completions/{request_id}", "X-Request-Id": request_id}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if sink is not None and not replayed:
            return stream_answer(request_id, sink, headers)
        found = await_final(request_id, wait) if wait else None
        if sink is not None and found is not None and found[0]["status"] == Status.COMPLETED.value:
            # A replayed streamed request: its events are gone, its result is not.
            return event_stream(headers, [completion_as_events(json.loads(found[0]["response_json"]))])
        if found is not None and Status(found[0]["status"]).final:
            return final_answer(request_id, found[0], headers)
        if replayed:
            found = found or _quietly(lookup, request_id)
            status = found[0]["status"] if found else Status.PENDING.value
            position = (found[1] if found else None) or 0
            active = _quietly(lambda _: queue.counts()[1], request_id) or 0
        else:
            status = Status.PENDING.value
            try:
                # Ours is the newest waiting job (puts here do not interleave unless a locked database
                # made one wait), so its place is the waiting count; 0 once the worker took it.
                position, active = queue.counts()
            except StorageUnavailable:
                position, active = 0, 0
        if wait:
            headers["Retry-After"] = RETRY_AFTER_POLL
        return json_response(
            202,
            {
                "request_id": request_id,
                "status": status,
                "queue_position": position,
                "active_requests": active,
            },
            headers=headers,
        )

    @api.delete("/v1/chat/completions/<request_id:path>")
    def cancel(request_id: str) -> HTTPResponse:
        owner = authenticate()
        if isinstance(owner, HTTPResponse):
            return owner
        if not REQUEST_ID.match(request_id):
            return not_found()
        try:
            found = lookup(request_id)
            if found is None or found[0].get("owner") != owner:
                return not_found()
            entry = found[0]
            if entry["status"] in (Status.COMPLETED.value, Status.ERROR.value):
                return error_response(
                    409, f"The request already ended ({entry['status']}).", "request_not_cancellable"
                )
            if entry["status"] != Status.CANCELLED.value:
                outcome = queue.cancel(request_id)
                if outcome == "cancelled":
                    # Never handed to the worker: it ends here.
                    entry = finish_cancelled(request_id, entry)
                elif outcome == "in_flight":
                    signal_cancel(request_id)
                    found = await_final(request_id, settings.cancel_wait) or found
                    entry = found[0]
        except StorageUnavailable as exc:
            return unavailable(exc)
        reply = HTTPResponse(body=status_json(request_id, entry), status=200)
        if not Status(entry["status"]).final:
            reply.status = 202
        reply.content_type = "application/json"
        return reply

    def finish_cancelled(request_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        queued_body = json.loads(entry["request_json"])
        final = {
            **{k: v for k, v in entry.items() if k in ("request_json", "owner", "attempts")},
            "status": Status.CANCELLED.value,
            "timestamp": now_ms(),
            "expires_at": now_ms() / 1000 + settings.result_ttl,
        }
        url = queued_body.get("webhookUrl") if isinstance(queued_body, dict) else None
        if url and outbox is not None:
            final["webhook"] = {"state": "pending", "attempts": 0}
        statuses.put(request_id, final, ttl=settings.result_ttl)
        if metrics is not None:
            metrics.finished(Status.CANCELLED.value)
        if url and outbox is not None:
            owe_webhook(outbox, request_id, final["owner"], str(url), webhook_json(request_id, final))
            notify()
        waiters.wake(request_id)
        return final

    def stream_answer(request_id: str, sink: Any, headers: dict[str, str]) -> HTTPResponse:
        # The 200 is held back a little, so that a failure before the first event (the upstream
        # refusing the request, say) is still a real HTTP error the SDK can raise.
        first = _next_event(sink, settings.stream_hold)
        if not first:
            found = _quietly(lookup, request_id)
            if found is not None and Status(found[0]["status"]).final:
                if found[0]["status"] != Status.COMPLETED.value:
                    return final_answer(request_id, found[0], headers)
                return event_stream(headers, [completion_as_events(json.loads(found[0]["response_json"]))])

        def events() -> Iterator[bytes]:
            relayed = bool(first)
            try:
                if first:
                    yield first
                while True:
                    item = _next_event(sink, settings.stream_keepalive)
                    if item is None:
                        break
                    if item:
                        relayed = True
                        yield item
                        continue
                    found = _quietly(lookup, request_id)
                    if found is not None and Status(found[0]["status"]).final and not relayed:
                        break  # finished without a relay (none could be opened): told below
                    # Comments keep proxies (Heroku's router cuts at 30 s of silence) from closing it.
                    yield b": keep-alive\n\n"
                found = await_final(request_id, settings.sync_wait_max)
                entry: dict[str, Any] = found[0] if found else {"status": Status.ERROR.value, "error": {}}
                if entry["status"] == Status.COMPLETED.value:
                    yield (
                        b"data: [DONE]\n\n"
                        if relayed
                        else completion_as_events(json.loads(entry["response_json"]))
                    )
                else:
                    error = error_object(entry)
                    yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
            finally:
                streaming.discard(request_id)
                if relays is not None:
                    relays.close_sink(request_id)

        streaming.add(request_id)
        return event_stream(headers, events())

    def await_final(request_id: str, seconds: float) -> tuple[dict[str, Any], int | None] | None:
        """The request's status once final, or as it stands after ``seconds``."""
        with waiters.watch(request_id) as became_final:
            found = _quietly(lookup, request_id)
            if found is None or not Status(found[0]["status"]).final:
                became_final.wait(seconds)
                found = _quietly(lookup, request_id) or found
        return found

    @api.get("/v1/chat/completions/<request_id:path>")
    def status(request_id: str) -> HTTPResponse:
        owner = authenticate()
        if isinstance(owner, HTTPResponse):
            return owner
        wait = wait_seconds(request.query.get("wait"), settings.sync_wait_max)
        if isinstance(wait, HTTPResponse):
            return wait
        if not REQUEST_ID.match(request_id):
            return not_found()
        try:
            with waiters.watch(request_id) as became_final:
                found = lookup(request_id)
                if found is None or found[0].get("owner") != owner:
                    return not_found()
                if wait and not Status(found[0]["status"]).final:
                    became_final.wait(wait)
                    found = lookup(request_id) or found
        except StorageUnavailable as exc:
            return unavailable(exc)
        entry, position = found
        reply = HTTPResponse(body=status_json(request_id, entry, position), status=200)
        reply.content_type = "application/json"
        if not Status(entry["status"]).final:
            reply.set_header("Retry-After", RETRY_AFTER_POLL)
        return reply

    def lookup(request_id: str) -> tuple[dict[str, Any], int | None] | None:
        """The request's status entry and, when pending, its place in line."""
        # The worker writes a status from its first attempt on; until then the queue has it.
        entry = statuses.get(request_id)
        queued = queue.find(request_id) if entry is None or entry["status"] == "pending" else None
        if entry is None and queued is not None:
            entry = pending_entry(queued)
        if entry is None:
            return None
        position = None
        if entry["status"] == Status.PENDING.value:
            # None: the worker is taking it right now.
            position = (queued.position if queued else None) or 0
        return entry, position

    def error_page(error: HTTPError) -> str:
        if error.status_code == 404:
            payload = error_payload(404, f"No route for {request.method} {request.path}", "not_found")
        else:
            payload = error_payload(error.status_code)
        response.content_type = "application/json"
        return json.dumps(payload)

    api.default_error_handler = error_page
    return SecureJSONMiddleware(api)


class LazyApp:
    """A WSGI app built from the environment on first use (for external WSGI servers)."""

    def __init__(self) -> None:
        self._app: WSGIApp | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self._app is None:
            from server import build_web

            self._app = build_web()[0]
        return self._app(environ, start_response)


app = LazyApp()


def main() -> int:
    from server import run_web

    return run_web()


if __name__ == "__main__":
    sys.exit(main())
