"""One call to the OpenAI-compatible upstream, classified for the retry policy.

Which failures are retried follows the official OpenAI SDK: connection errors, timeouts, 408, 409,
429 and 5xx; never other 4xx nor a 429 whose code is ``insufficient_quota`` (it will not go away).
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import certifi
import gevent
import urllib3

from streaming import CompletionAssembler

log = logging.getLogger("llm_proxy.upstream")

USER_AGENT = "llm-proxy/1.0"
RETRY_AFTER_CEILING = 60.0
"""An upstream Retry-After above this is not waited out in full (the SDK's own limit)."""
_MAX_MESSAGE = 500


@dataclass(frozen=True, kw_only=True)
class Outcome:
    response_json: str | None = None
    """The upstream's chat.completion exactly as it sent it (checked to be a JSON object)."""
    error: dict[str, Any] = field(default_factory=dict)
    """``{"message", "type", ...}`` when the call failed."""
    retryable: bool = False
    retry_after: float | None = None
    relayed: bool = False
    """Part of a streamed answer already reached the client: it cannot be retried."""

    @property
    def ok(self) -> bool:
        return self.response_json is not None


def forwarded_body(body: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
    """What goes upstream: the client's body minus our own field; non-streamed unless relayed."""
    dropped = ("webhookUrl",) if stream else ("webhookUrl", "stream", "stream_options")
    return {k: v for k, v in body.items() if k not in dropped}


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rand: random.Random | None = None,
) -> float:
    """Wait before attempt ``attempt + 1`` (attempts count from 1): the upstream's hint when it gave
    a usable one, else ``base * 2**(attempt-1)`` capped, minus up to 25% jitter."""
    if retry_after is not None and retry_after <= RETRY_AFTER_CEILING:
        return retry_after
    delay = min(base * (2 ** (attempt - 1)), cap)
    if retry_after is not None:
        delay = max(delay, min(cap, RETRY_AFTER_CEILING))
    jitter: float = (rand or random).random()
    return float(delay * (1 - 0.25 * jitter))


def _upstream_error(payload: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """The upstream's (message, code, type), from OpenAI's error shape when it used it."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message, code, kind = error.get("message"), error.get("code"), error.get("type")
        return (
            str(message)[:_MAX_MESSAGE] if message else fallback,
            str(code) if code else None,
            str(kind) if kind else None,
        )
    if isinstance(error, str):
        return error[:_MAX_MESSAGE], None, None
    return fallback, None, None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> tuple[str | None, Any]:
    """(text, value) of a strict JSON body; (None, None) if it is not one."""
    try:
        text = raw.decode("utf-8")
        return text, json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None


def classify_response(status: int, raw: bytes, headers: Any) -> Outcome:
    text, payload = parse_json(raw)
    if 200 <= status < 300:
        if isinstance(payload, dict):
            return Outcome(response_json=text)
        return Outcome(
            error={
                "message": "the upstream answered with a body that is not a JSON object",
                "type": "upstream_error",
                "upstream_status": status,
            },
            retryable=True,
        )
    message, code, kind = _upstream_error(payload, f"the upstream answered HTTP {status}")
    error: dict[str, Any] = {"message": message, "type": "upstream_error", "upstream_status": status}
    if code:
        error["code"] = code
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        # Kept whole so a waiting client gets the upstream's own error object.
        error["upstream_error"] = payload["error"]
    retry_after = parse_retry_after(headers)
    if status == 429:
        error["type"] = "rate_limited"
        # Retrying cannot fix a quota that is used up.
        exhausted = "insufficient_quota" in (code, kind)
        return Outcome(error=error, retryable=not exhausted, retry_after=retry_after)
    retryable = status in (408, 409) or status >= 500
    return Outcome(error=error, retryable=retryable, retry_after=retry_after if retryable else None)


class UpstreamClient:
    """Posts chat completions to ``{base_url}/chat/completions`` over one keep-alive pool.

    It drives urllib3 (the engine under requests) directly: py-spy showed requests' own per-call
    bookkeeping (prepare_request, merge_setting, hooks) taking about a third of the worker's CPU
    at high completion rates, more than the HTTP exchange itself.
    """

    def __init__(self, *, base_url: str, api_key: str | None, timeout: float, pool_size: int) -> None:
        parts = urllib3.util.parse_url(base_url.rstrip("/") + "/chat/completions")
        self._path = parts.request_uri
        self._timeout = timeout
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

    def complete(self, body: dict[str, Any]) -> Outcome:
        data = json.dumps(forwarded_body(body)).encode("utf-8")

        def attempt() -> Outcome:
            reply = self._post(data, preload=True)
            return classify_response(reply.status, reply.data, reply.headers)

        return self._guarded(attempt)

    def stream(self, body: dict[str, Any], on_event: Callable[[bytes], None]) -> Outcome:
        """A streamed call: each event goes to ``on_event`` as it arrives, and the outcome holds
        the assembled completion. A failure before the first event is retryable as usual."""
        data = json.dumps(forwarded_body(body, stream=True)).encode("utf-8")
        relayed = False

        def attempt() -> Outcome:
            nonlocal relayed
            reply = self._post(data, preload=False)
            try:
                if not 200 <= reply.status < 300 or "event-stream" not in (
                    reply.headers.get("content-type") or ""
                ):
                    return classify_response(reply.status, reply.read(), reply.headers)
                assembler = CompletionAssembler()
                buffer = b""
                for piece in reply.stream(8192):
                    buffer += piece
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        payload = line.rstrip(b"\r")
                        if not payload.startswith(b"data:"):
                            continue
                        payload = payload[5:].strip()
                        if payload == b"[DONE]":
                            return Outcome(response_json=json.dumps(assembler.completion()), relayed=relayed)
                        _, chunk = parse_json(payload)
                        if not isinstance(chunk, dict):
                            continue
                        if isinstance(chunk.get("error"), dict):
                            outcome = classify_response(500, payload, {})
                            return Outcome(error=outcome.error, retryable=not relayed, relayed=relayed)
                        assembler.add(chunk)
                        on_event(b"data: " + payload + b"\n\n")
                        relayed = True
                error = {"message": "the upstream's stream ended before [DONE]", "type": "upstream_error"}
                return Outcome(error=error, retryable=not relayed, relayed=relayed)
            finally:
                # A stream may stop anywhere: the connection is not reused.
                reply.close()

        outcome = self._guarded(attempt)
        return _cut_short(outcome, relayed) if relayed and not outcome.ok else outcome

    def _post(self, data: bytes, *, preload: bool) -> Any:
        return self._pool.urlopen(
            "POST",
            self._path,
            body=data,
            headers=self._headers,
            redirect=False,
            retries=False,
            preload_content=preload,
        )

    def _guarded(self, attempt: Callable[[], Outcome]) -> Outcome:
        """One call under a total deadline (urllib3's read timeout is per socket read, not for the
        whole answer), with transport failures turned into outcomes."""
        deadline = gevent.Timeout(self._timeout)
        deadline.start()
        try:
            return attempt()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            return _timeout_outcome(self._timeout)
        except urllib3.exceptions.TimeoutError as exc:
            # urllib3 files a refused connection under its timeouts; it is a network error to us.
            if not isinstance(exc, urllib3.exceptions.NewConnectionError):
                return _timeout_outcome(self._timeout)
            return _network_outcome(exc)
        except urllib3.exceptions.HTTPError as exc:
            return _network_outcome(exc)
        finally:
            deadline.close()

    def close(self) -> None:
        self._pool.close()


def _cut_short(outcome: Outcome, relayed: bool) -> Outcome:
    return Outcome(error=outcome.error, retryable=outcome.retryable and not relayed, relayed=relayed)


def _network_outcome(exc: Exception) -> Outcome:
    # The exception text can carry the URL; the class name says enough.
    log.warning("upstream call failed: %s", type(exc).__name__)
    return Outcome(
        error={"message": f"could not reach the upstream ({type(exc).__name__})", "type": "network_error"},
        retryable=True,
    )


def _timeout_outcome(seconds: float) -> Outcome:
    return Outcome(
        error={"message": f"the upstream did not answer within {seconds:g} s", "type": "timeout"},
        retryable=True,
    )
