"""Calls to the OpenAI-compatible upstream over one keep-alive urllib3 pool."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import certifi
import gevent
import urllib3

from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.upstream.outcome import (
    Outcome,
    classify_response,
    cut_short,
    forwarded_body,
    network_outcome,
    parse_json,
    rate_headers,
    timeout_outcome,
    too_large_outcome,
)
from llm_proxy.upstream.sse import assembler_for, sse_events

log = logging.getLogger("llm_proxy.upstream")

USER_AGENT = "llm-proxy/1.0"
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_PIECE = 64 * 1024
"""Most read from the socket at once: what one read brings, so an event is relayed when it comes."""


class _TooLarge(Exception):
    """The answer went past ``max_response_bytes``."""


class _Overtime(Exception):
    """The call's deadline passed while its body was still flowing."""


class UpstreamClient:
    """Posts requests to ``{base_url}/{endpoint}`` (``chat/completions``, ``embeddings``, ...) over
    one keep-alive pool.

    It drives urllib3 (the engine under requests) directly: py-spy showed requests' own per-call
    bookkeeping (prepare_request, merge_setting, hooks) taking about a third of the worker's CPU
    at high completion rates, more than the HTTP exchange itself.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        timeout: float,
        pool_size: int,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        parts = urllib3.util.parse_url(base_url.rstrip("/") + "/" + Endpoint.CHAT.value)
        base = base_url.rstrip("/") + "/"
        self._paths = {e: urllib3.util.parse_url(base + e.value).request_uri for e in Endpoint}
        self._base = base
        self._timeout = timeout
        self._max_bytes = max_response_bytes
        self._pool = urllib3.connection_from_url(
            parts.url,
            maxsize=max(1, pool_size),
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=min(10.0, timeout), read=timeout),
            **({"ca_certs": certifi.where()} if parts.scheme == "https" else {}),
        )
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def complete(self, body: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> Outcome:
        data = json.dumps(forwarded_body(body)).encode("utf-8")

        def attempt(ends: float) -> Outcome:
            reply = self._post(data, self._paths[endpoint])
            try:
                return classify_response(reply.status, b"".join(self._body(reply, ends)), reply.headers)
            finally:
                _discard(reply)

        return self._guarded(attempt)

    def stream(
        self, body: dict[str, Any], on_event: Callable[[bytes], None], endpoint: Endpoint = Endpoint.CHAT
    ) -> Outcome:
        """A streamed call: each event goes to ``on_event`` as it arrives, and the outcome holds
        the assembled result (for the Responses API, the ``response`` of its final event). A
        failure before the first event is retryable as usual."""
        data = json.dumps(forwarded_body(body, stream=True)).encode("utf-8")
        relayed = False

        def attempt(ends: float) -> Outcome:
            nonlocal relayed
            reply = self._post(data, self._paths[endpoint])
            try:
                if not 200 <= reply.status < 300 or "event-stream" not in (
                    reply.headers.get("content-type") or ""
                ):
                    return classify_response(reply.status, b"".join(self._body(reply, ends)), reply.headers)
                assembler = assembler_for(endpoint)
                sent = 0
                answered = {"status": reply.status, "rate_headers": rate_headers(reply.headers)}
                for received in sse_events(self._body(reply, ends)):
                    payload = received.data
                    if payload == b"[DONE]":
                        return Outcome(
                            response_json=json.dumps(assembler.completion()), relayed=relayed, **answered
                        )
                    _, chunk = parse_json(payload)
                    if not isinstance(chunk, dict):
                        continue
                    failure = assembler.failure(chunk)
                    if failure is not None:
                        outcome = classify_response(500, json.dumps({"error": failure}).encode(), {})
                        return Outcome(
                            error=outcome.error, retryable=not relayed, relayed=relayed, **answered
                        )
                    event = received.raw
                    sent += len(event)
                    if sent > self._max_bytes:
                        raise _TooLarge
                    assembler.add(chunk)
                    on_event(event)
                    relayed = True
                    if assembler.done:
                        # The Responses API's last event: it sends no [DONE].
                        return Outcome(
                            response_json=json.dumps(assembler.completion()), relayed=relayed, **answered
                        )
                error = {
                    "message": "the upstream's stream ended before its final event",
                    "type": "upstream_error",
                }
                return Outcome(error=error, retryable=not relayed, relayed=relayed, **answered)
            finally:
                _discard(reply)

        outcome = self._guarded(attempt)
        return cut_short(outcome, relayed) if relayed and not outcome.ok else outcome

    def _body(self, reply: urllib3.BaseHTTPResponse, ends: float) -> Iterator[bytes]:
        """The body as it arrives, never more than ``max_response_bytes`` of it, and not past the
        monotonic time ``ends``. Each piece is what one socket read brought: a stream whose end is
        the connection's close is relayed event by event, not 8 KB or the whole stream at a time."""
        declared = (reply.headers.get("content-length") or "").strip()
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise _TooLarge
        received = 0
        while piece := reply.read1(_PIECE):
            received += len(piece)
            if received > self._max_bytes:
                raise _TooLarge
            yield piece
            # A body that is always ready to read never blocks this greenlet, so without this
            # the other calls, the web side and the deadline's own timer would wait for its end.
            gevent.sleep(0)
            if time.monotonic() >= ends:
                raise _Overtime

    def models(self) -> Outcome:
        """``GET {base_url}/models``, once, under the same deadline as a call."""
        return self.fetch("GET", "models")

    def fetch(self, method: str, path: str) -> Outcome:
        """``method {base_url}/{path}`` (``path`` may carry a query string) without a body, once,
        under the same deadline as a call."""
        target = urllib3.util.parse_url(self._base + path).request_uri

        def attempt(ends: float) -> Outcome:
            reply = self._pool.urlopen(
                method,
                target,
                headers=self._headers,
                redirect=False,
                retries=False,
                preload_content=False,
            )
            try:
                return classify_response(reply.status, b"".join(self._body(reply, ends)), reply.headers)
            finally:
                _discard(reply)

        return self._guarded(attempt)

    def _post(self, data: bytes, path: str) -> Any:
        return self._pool.urlopen(
            "POST",
            path,
            body=data,
            headers=self._headers,
            redirect=False,
            retries=False,
            preload_content=False,
        )

    def _guarded(self, attempt: Callable[[float], Outcome]) -> Outcome:
        """One call under a total deadline (urllib3's read timeout is per socket read, not for the
        whole answer), with transport failures turned into outcomes. ``attempt`` gets the deadline
        as a monotonic time, for the body's reads to check between pieces."""
        deadline = gevent.Timeout(self._timeout)
        deadline.start()
        try:
            return attempt(time.monotonic() + self._timeout)
        except _TooLarge:
            return too_large_outcome(self._max_bytes)
        except _Overtime:
            return timeout_outcome(self._timeout)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            return timeout_outcome(self._timeout)
        except urllib3.exceptions.TimeoutError as exc:
            # urllib3 files a refused connection under its timeouts; it is a network error to us.
            if not isinstance(exc, urllib3.exceptions.NewConnectionError):
                return timeout_outcome(self._timeout)
            return self._unreachable(exc)
        except urllib3.exceptions.HTTPError as exc:
            return self._unreachable(exc)
        finally:
            deadline.close()

    def _unreachable(self, exc: Exception) -> Outcome:
        # The exception text can carry the URL; the class name says enough.
        log.warning("upstream call failed: %s", type(exc).__name__)
        return network_outcome(exc)

    def close(self) -> None:
        self._pool.close()


def _discard(reply: urllib3.BaseHTTPResponse) -> None:
    """Close what is left of an answer. A body read to its end has already given its connection
    back to the pool (urllib3 does that), and this does nothing; one stopped anywhere else leaves
    unread bytes on its connection, which is closed rather than reused."""
    reply.close()
    reply.release_conn()
