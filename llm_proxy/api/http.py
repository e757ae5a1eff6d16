"""HTTP plumbing of the API: JSON error bodies, the headers every answer carries (errors and crashes
included), and reading headers and bodies safely."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import gevent
from bottle import HTTPResponse, request

log = logging.getLogger("llm_proxy.http")

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Origin-Agent-Cluster", "?1"),
    ("Referrer-Policy", "no-referrer"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-DNS-Prefetch-Control", "off"),
    ("X-Download-Options", "noopen"),
    ("X-Frame-Options", "SAMEORIGIN"),
    ("X-Permitted-Cross-Domain-Policies", "none"),
    ("X-XSS-Protection", "0"),
    ("Cache-Control", "no-store"),
)
_SECURITY_HEADER_LIST = list(SECURITY_HEADERS)

_REASONS = {
    400: ("Bad request", "invalid_request_error"),
    401: ("Invalid or missing API key", "authentication_error"),
    404: ("Not found", "not_found"),
    405: ("Method not allowed", "method_not_allowed"),
    413: ("Request body too large", "request_too_large"),
    500: ("Internal server error", "internal_error"),
    503: ("Service temporarily unavailable", "service_unavailable"),
}


def error_payload(
    status: int, message: str | None = None, kind: str | None = None, **extra: Any
) -> dict[str, Any]:
    default_message, default_kind = _REASONS.get(
        status, ("Request failed", "invalid_request_error" if status < 500 else "internal_error")
    )
    error: dict[str, Any] = {"message": message or default_message, "type": kind or default_kind}
    error.update(extra)
    return {"error": error}


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> HTTPResponse:
    response = HTTPResponse(body=json.dumps(payload), status=status)
    response.content_type = "application/json"
    for name, value in (headers or {}).items():
        response.set_header(name, value)
    return response


def error_response(
    status: int,
    message: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> HTTPResponse:
    return json_response(status, error_payload(status, message, kind, **extra), headers)


StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class SecureJSONMiddleware:
    """Adds the security headers to every response and turns anything that escapes the app into a
    JSON 500 (Bottle's after_request hooks do not run for those)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def secured(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Our routes never set these headers themselves, so appending is enough.
            return start_response(status, headers + _SECURITY_HEADER_LIST, exc_info)

        try:
            return self.app(environ, secured)
        except Exception:
            log.exception(
                "unhandled error for %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            body = json.dumps(error_payload(500)).encode()
            secured(
                "500 Internal Server Error",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                sys.exc_info(),
            )
            return [body]


class BodyTooLarge(Exception):
    pass


class BadLength(Exception):
    """The Content-Length header is not a number."""


BODY_TIMEOUT = 60.0
"""Seconds a request body may take to arrive in full. Without a deadline a client that sends a byte
now and then holds its connection (and a descriptor) for ever; a megabyte takes seconds on a slow
link, so 60 s only ends clients that are stalled or hostile."""


class UnreadableBody(Exception):
    """The body could not be read: broken chunked framing, cut short, or too slow. Where the next
    request would start is then unknown, so the answer closes the connection."""

    def __init__(self, status: int, kind: str, message: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.message = message
        self.detail = detail

    def response(self) -> HTTPResponse:
        return error_response(
            self.status,
            self.message,
            self.kind,
            headers={"Connection": "close"},
            details=[{"path": "", "message": self.detail}],
        )


def header(name: str) -> str | None:
    """A request header as the WSGI server gave it (latin-1). Bottle's own accessor re-decodes
    values as UTF-8 and raises on bytes that are not, which must never become a 500."""
    value = request.environ.get("HTTP_" + name.upper().replace("-", "_"))
    return value if isinstance(value, str) else None


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes without reading them all, and a body that is
    malformed, cut short or slower than ``BODY_TIMEOUT`` (``UnreadableBody``)."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    declared = environ.get("CONTENT_LENGTH") or ""
    length: int | None = None
    if declared.strip():
        try:
            length = int(declared)
        except ValueError:
            raise BadLength from None
        if length > limit:
            raise BodyTooLarge
    elif "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    deadline = gevent.Timeout(BODY_TIMEOUT)
    deadline.start()
    try:
        return _read_all(stream, length, limit)
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        raise UnreadableBody(
            408,
            "request_timeout",
            f"The request body did not arrive within {BODY_TIMEOUT:g} s.",
            "body too slow",
        ) from None
    except (OSError, ValueError) as exc:
        # gevent's input raises these for a bad chunk size, a missing CRLF, an oversized chunk
        # extension or trailer, and an end of stream before the declared length: client errors.
        detail = (
            "the body is shorter than its Content-Length" if length is not None else "malformed chunked body"
        )
        log.info("unreadable request body: %s (%s)", detail, exc)
        raise UnreadableBody(400, "validation_error", "Invalid request body", detail) from None
    finally:
        deadline.close()


def _read_all(stream: Any, length: int | None, limit: int) -> bytes:
    if length is not None:
        return bytes(stream.read(length)) if length > 0 else b""
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
