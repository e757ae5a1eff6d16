"""The routes of the HTTP API (Bottle): each reads the request, calls the ``RequestService`` and
turns its result into an answer. ``create_app`` builds the WSGI app from its collaborators."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottle import Bottle, HTTPError, HTTPResponse, request, response

from llm_proxy.api.answers import failed_answer, final_answer, still_running
from llm_proxy.api.auth import KeyAuth, KeyChecker
from llm_proxy.api.http import (
    BadLength,
    BodyTooLarge,
    SecureJSONMiddleware,
    UnreadableBody,
    WSGIApp,
    error_payload,
    error_response,
    header,
    json_response,
    read_body,
)
from llm_proxy.api.service import Accepted, Ended, Found, RequestService
from llm_proxy.api.streams import WatchedSink, replayed_stream, stream_answer
from llm_proxy.api.validation import BodyError, parse_body
from llm_proxy.domain.endpoints import Endpoint, endpoint_of
from llm_proxy.domain.job import Job, new_request_id, now_ms
from llm_proxy.domain.status import Status
from llm_proxy.domain.views import status_json
from llm_proxy.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llm_proxy.services.health import HEALTHY, Health
from llm_proxy.storage.base import IdempotencyConflict, QueueFull, StorageUnavailable, WebSignals
from llm_proxy.upstream.outcome import Outcome
from llm_proxy.webhooks.safety import ALLOW_PRIVATE_HINT, check_url_literal

log = logging.getLogger("llm_proxy.api")

OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.json"
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
STORED_RESPONSE = re.compile(r"^(resp_[A-Za-z0-9]{1,200})(/input_items)?$")
"""The upstream's own id of a Responses API answer (``store``), read or deleted there."""
_RELAYED_QUERY = re.compile(r"^[A-Za-z0-9_.~%=&+\-\[\]]*$")
RETRY_AFTER_UNAVAILABLE = "5"
RETRY_AFTER_QUEUE_FULL = "10"
RETRY_AFTER_POLL = "1"


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    max_body_bytes: int
    webhook_allow_private: bool = False
    sync_wait_max: float = 25.0
    metrics_public: bool = False
    stream_hold: float = 3.0
    """How long a streamed answer may hold back its 200 waiting for its first event or its end
    (and never longer than the client's wait)."""
    stream_keepalive: float = 10.0


def preferred_wait(prefer: str | None, cap: float) -> float:
    """Seconds asked for by ``Prefer: wait`` / ``Prefer: wait=N`` (RFC 7240), capped; 0 if not asked."""
    asked = _asked_wait(prefer, cap)
    return 0.0 if asked is None else asked


def _asked_wait(prefer: str | None, cap: float) -> float | None:
    """As the RFC says, a preference that cannot be understood is ignored: None then, as when
    there is none."""
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
            return None
        return min(seconds, cap) if 0 <= seconds < float("inf") else None
    return None


def asks_async(prefer: str | None) -> bool:
    """``Prefer: respond-async`` (RFC 7240): the 202 at once, or after its ``wait``."""
    return any(
        preference.split(";")[0].partition("=")[0].strip().lower() == "respond-async"
        for preference in (prefer or "").split(",")
    )


def submit_wait(prefer: str | None, cap: float, *, sdk: bool) -> float:
    """How long a submit waits for the result. The OpenAI SDKs (and LiteLLM, LangChain, ... on
    them) cannot read a 202, so their requests wait unless they ask for ``respond-async``; other
    clients get the 202 at once unless they ask to wait."""
    asked = _asked_wait(prefer, cap)
    if asked is not None:
        return asked
    return cap if sdk and not asks_async(prefer) else 0.0


def from_openai_sdk() -> bool:
    """The OpenAI SDKs send ``X-Stainless-Lang`` (and their other X-Stainless-* headers) on
    every request."""
    return header("X-Stainless-Lang") is not None


def wait_seconds(raw: str | None, cap: float) -> float | None:
    """The ``wait`` of a long-poll: seconds, capped; None when it is not a number >= 0."""
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return min(seconds, cap) if 0 <= seconds < float("inf") else None


def belongs(request_id: str, endpoint: Endpoint) -> bool:
    """A well-formed id issued for this endpoint: an id read under another endpoint is unknown
    there (a 404, as for any id that is not found)."""
    return bool(REQUEST_ID.match(request_id)) and endpoint_of(request_id) is endpoint


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


def invalid_body(details: list[dict[str, str]]) -> HTTPResponse:
    return error_response(400, "Invalid request body", "validation_error", details=details)


def status_reply(request_id: str, found: Found) -> HTTPResponse:
    reply = HTTPResponse(body=status_json(request_id, found.entry, found.position), status=200)
    reply.content_type = "application/json"
    return reply


def create_app(
    *,
    service: RequestService,
    keys: KeyChecker,
    settings: ApiSettings,
    render_metrics: Callable[[], bytes],
    signals: WebSignals | None = None,
    health: Callable[[], Health] = lambda: HEALTHY,
    models: Callable[[], Outcome] | None = None,
    relay: Callable[[str, str], Outcome] | None = None,
) -> WSGIApp:
    """``models`` lists the upstream's models (``ModelList.get``); without it ``GET /v1/models``
    answers 502, as for an upstream that cannot be reached. ``relay(method, path)`` makes a call
    without a body to the upstream (``UpstreamClient.fetch``): the Responses API's stored answers
    are read and deleted there by their own ids; without it those ids are not found."""
    # Exceptions propagate to SecureJSONMiddleware, which logs them once and answers a JSON 500
    # (with catchall, Bottle would also write the traceback to wsgi.errors).
    api = Bottle()
    api.config["catchall"] = False
    api.install(KeyAuth(keys))
    openapi = OPENAPI_PATH.read_bytes()

    @api.get("/health", auth=False)
    def health_check() -> HTTPResponse:
        found = health()
        return json_response(200 if found.ok else 503, found.to_dict())

    @api.get("/metrics", auth=not settings.metrics_public)
    def prometheus(owner: str | None = None) -> HTTPResponse:
        try:
            text = render_metrics()
        except StorageUnavailable as exc:
            return unavailable(exc)
        reply = HTTPResponse(body=text, status=200)
        reply.set_header("Content-Type", METRICS_CONTENT_TYPE)
        return reply

    @api.get("/openapi.json", auth=False)
    def openapi_document() -> HTTPResponse:
        reply = HTTPResponse(body=openapi, status=200)
        reply.content_type = "application/json"
        return reply

    @api.get("/v1/models")
    def list_models(owner: str) -> HTTPResponse:
        found = models() if models is not None else None
        if found is None:
            return failed_answer({"message": "no upstream to list models from", "type": "upstream_error"}, {})
        if not found.ok:
            return failed_answer(found.error, {})
        reply = HTTPResponse(body=found.response_json, status=200)
        reply.content_type = "application/json"
        return reply

    def submit(endpoint: Endpoint, owner: str) -> HTTPResponse:
        try:
            body = parse_body(endpoint, read_body(request.environ, settings.max_body_bytes))
        except BodyTooLarge:
            return error_response(
                413, f"The request body exceeds {settings.max_body_bytes} bytes.", "request_too_large"
            )
        except BadLength:
            return invalid_body([{"path": "", "message": "invalid Content-Length"}])
        except UnreadableBody as exc:
            return exc.response()
        except BodyError as exc:
            return invalid_body(exc.details)
        webhook_url = body.get("webhookUrl")
        if webhook_url and not settings.webhook_allow_private:
            problem = check_url_literal(webhook_url)
            if problem:
                # A local receiver is the usual first try: say what allows it.
                message = f"not an allowed webhook destination: {problem}; {ALLOW_PRIVATE_HINT}"
                return invalid_body([{"path": "webhookUrl", "message": message}])
        key = header("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY.match(key):
            return error_response(
                400,
                "Idempotency-Key must be 1 to 255 printable ASCII characters.",
                "invalid_request_error",
                param="Idempotency-Key",
            )
        prefer = header("Prefer")
        sdk = from_openai_sdk()
        wait = submit_wait(prefer, settings.sync_wait_max, sdk=sdk)
        # A client that cannot read a 202 gets an error it raises when the wait runs out.
        no_202 = sdk and not asks_async(prefer)
        streamed = endpoint.streams and bool(body.get("stream")) and wait > 0 and signals is not None
        job = Job(
            request_id=new_request_id(endpoint), body=body, owner=owner, submitted_at=now_ms(), relay=streamed
        )
        # Opened before the job is queued, so neither a relayed event nor the final state can
        # arrive before it.
        sink = WatchedSink(service, signals, job.request_id) if streamed and signals is not None else None
        streaming = False
        try:
            accepted = service.submit(job, key)
            reply = answer_submit(endpoint, accepted, wait, sink, no_202=no_202)
            streaming = sink is not None and not accepted.replayed
            return reply
        except QueueFull as exc:
            return error_response(
                429,
                f"The queue is full ({exc.limit} requests waiting); retry later.",
                "queue_full",
                headers={"Retry-After": RETRY_AFTER_QUEUE_FULL},
            )
        except IdempotencyConflict as exc:
            return error_response(
                422,
                "This Idempotency-Key was already used with a different request body.",
                "idempotency_error",
                request_id=exc.request_id,
            )
        except StorageUnavailable as exc:
            return unavailable(exc)
        finally:
            # Unless an event stream now owns the sink (it closes it when it ends).
            if sink is not None and not streaming:
                sink.close()

    def answer_submit(
        endpoint: Endpoint, accepted: Accepted, wait: float, sink: Any, *, no_202: bool
    ) -> HTTPResponse:
        request_id = accepted.request_id
        headers = {"Location": f"{endpoint.path}/{request_id}", "X-Request-Id": request_id}
        if accepted.replayed:
            headers["Idempotent-Replayed"] = "true"
        if sink is not None and not accepted.replayed:
            return stream_answer(
                service,
                request_id,
                sink,
                headers,
                hold=min(settings.stream_hold, wait),
                keepalive=settings.stream_keepalive,
                wait_max=settings.sync_wait_max,
                endpoint=endpoint,
            )
        found = service.await_final(request_id, wait) if wait else None
        if found is not None and found.entry.status.final:
            if sink is not None and found.entry.status is Status.COMPLETED:
                return replayed_stream(found.entry, headers, endpoint)
            return final_answer(found.entry, headers)
        if wait and no_202:
            return still_running(request_id, wait, headers, endpoint.path)
        place = service.place(accepted, found)
        if wait:
            headers["Retry-After"] = RETRY_AFTER_POLL
        return json_response(
            202,
            {
                "request_id": request_id,
                "status": place.status.value,
                "queue_position": place.position,
                "active_requests": place.active,
            },
            headers=headers,
        )

    def stored_response(method: str, request_id: str) -> HTTPResponse | None:
        """A Responses API answer kept by the upstream (``store``), by the id the upstream gave
        it: the SDK's ``responses.retrieve``, ``input_items.list`` and ``delete`` pass through."""
        found = STORED_RESPONSE.match(request_id)
        if relay is None or found is None or (method == "DELETE" and found.group(2)):
            return None
        query = request.query_string
        if not _RELAYED_QUERY.match(query) or "stream" in request.query:
            return error_response(
                400, "Only plain reads of a stored response are relayed (no stream).", "invalid_request_error"
            )
        answer = relay(method, f"responses/{request_id}" + (f"?{query}" if query else ""))
        if not answer.ok:
            return failed_answer(answer.error, {})
        reply = HTTPResponse(body=answer.response_json, status=answer.status or 200)
        reply.content_type = "application/json"
        return reply

    def status(endpoint: Endpoint, request_id: str, owner: str) -> HTTPResponse:
        if endpoint is Endpoint.RESPONSES and (relayed := stored_response("GET", request_id)) is not None:
            return relayed
        wait = wait_seconds(request.query.get("wait"), settings.sync_wait_max)
        if wait is None:
            return error_response(
                400, "wait must be a number of seconds >= 0", "invalid_request_error", param="wait"
            )
        if not belongs(request_id, endpoint):
            return not_found()
        try:
            found = service.status(owner, request_id, wait)
        except StorageUnavailable as exc:
            return unavailable(exc)
        if found is None:
            return not_found()
        reply = status_reply(request_id, found)
        if not found.entry.status.final:
            reply.set_header("Retry-After", RETRY_AFTER_POLL)
        return reply

    def cancel(endpoint: Endpoint, request_id: str, owner: str) -> HTTPResponse:
        if endpoint is Endpoint.RESPONSES and (relayed := stored_response("DELETE", request_id)) is not None:
            return relayed
        if not belongs(request_id, endpoint):
            return not_found()
        try:
            result = service.cancel(owner, request_id)
        except StorageUnavailable as exc:
            return unavailable(exc)
        if result is None:
            return not_found()
        if isinstance(result, Ended):
            return error_response(
                409, f"The request already ended ({result.entry.status.value}).", "request_not_cancellable"
            )
        reply = status_reply(request_id, Found(result.entry, None))
        if not result.entry.status.final:
            reply.status = 202
        return reply

    # Every endpoint the same way: submit, status and cancel, under its own path.
    for endpoint in Endpoint:
        api.route(endpoint.path, "POST", functools.partial(submit, endpoint))
        api.route(f"{endpoint.path}/<request_id:path>", "GET", functools.partial(status, endpoint))
        api.route(f"{endpoint.path}/<request_id:path>", "DELETE", functools.partial(cancel, endpoint))

    def error_page(error: HTTPError) -> str:
        if error.status_code == 404:
            payload = error_payload(404, f"No route for {request.method} {request.path}", "not_found")
        else:
            payload = error_payload(error.status_code)
        response.content_type = "application/json"
        return json.dumps(payload)

    api.default_error_handler = error_page
    return SecureJSONMiddleware(api)
