"""The HTTP answers a wait-mode client gets: what OpenAI itself would have answered."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bottle import HTTPResponse

from llm_proxy.api.http import error_response, json_response
from llm_proxy.domain.status import Status, StatusEntry


def without_location(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name != "Location"}


def final_answer(entry: StatusEntry, headers: dict[str, str]) -> HTTPResponse:
    """The upstream's object (chat.completion, embedding list, response, ...) unchanged, or an
    OpenAI-shaped error with the status the SDK maps to the right exception, told not to retry
    (we did)."""
    kept = without_location(headers)
    if entry.status is Status.CANCELLED:
        return error_response(409, "The request was cancelled.", "request_cancelled", headers=kept)
    if entry.status is Status.COMPLETED:
        reply = HTTPResponse(body=entry.response_json, status=200)
        reply.content_type = "application/json"
        for name, value in kept.items():
            reply.set_header(name, value)
        return reply
    return failed_answer(entry.error or {}, {**kept, "x-should-retry": "false"})


def failed_answer(error: dict[str, Any], headers: dict[str, str]) -> HTTPResponse:
    """An upstream failure as the upstream's status and error object (502 when no answer came,
    504 when none came in time)."""
    upstream = error.get("upstream_status")
    if isinstance(upstream, int) and 400 <= upstream <= 599:
        status = upstream
    else:
        status = 504 if error.get("type") == "timeout" else 502
    return json_response(status, {"error": _error_object(error)}, headers=headers)


def still_running(
    request_id: str, waited: float, headers: dict[str, str], path: str = "/v1/chat/completions"
) -> HTTPResponse:
    """A wait that ran out, for a client that cannot read a 202 (the OpenAI SDKs would make an
    empty completion of it): an error it raises. 504, as a gateway that got no answer in time;
    with ``x-should-retry: false``, since a retry would queue (and pay for) the request again."""
    message = (
        f"Request {request_id} did not finish within the {waited:g} s wait and goes on running; "
        f"collect its result with GET {path}/{request_id} (add ?wait=N to long-poll)."
    )
    return error_response(
        504,
        message,
        "wait_timeout",
        headers={**headers, "x-should-retry": "false"},
        param=None,
        code="wait_timeout",
        request_id=request_id,
    )


def error_object(entry: StatusEntry | None) -> dict[str, Any]:
    """The OpenAI-shaped error of a failed request: the upstream's own when it sent one."""
    return _error_object((entry.error if entry else None) or {})


def _error_object(error: dict[str, Any]) -> dict[str, Any]:
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
    for name, value in without_location(headers).items():
        reply.set_header(name, value)
    return reply
