"""What one upstream call came to, classified for the retry policy (pure: no I/O).

Which failures are retried follows the official OpenAI SDK: connection errors, timeouts, 408, 409,
429 and 5xx; never other 4xx nor a 429 whose code is ``insufficient_quota`` (it will not go away).
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

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
    status: int | None = None
    """The upstream's HTTP status; None when no answer came."""
    rate_headers: dict[str, str] = field(default_factory=dict)
    """The answer's x-ratelimit-* and retry-after headers, for the rate limiter."""

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


def rate_headers(headers: Any) -> dict[str, str]:
    """The headers the rate limiter reads, lower-cased (few: cheap to keep on every outcome)."""
    if not headers:
        return {}
    return {
        name.lower(): str(value)
        for name, value in headers.items()
        if name.lower().startswith("x-ratelimit-") or name.lower() in ("retry-after", "retry-after-ms")
    }


def classify_response(status: int, raw: bytes, headers: Any) -> Outcome:
    outcome = _classify(status, raw, headers)
    return dataclasses.replace(outcome, status=status, rate_headers=rate_headers(headers))


def _classify(status: int, raw: bytes, headers: Any) -> Outcome:
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


def cut_short(outcome: Outcome, relayed: bool) -> Outcome:
    return Outcome(
        error=outcome.error,
        retryable=outcome.retryable and not relayed,
        relayed=relayed,
        status=outcome.status,
        rate_headers=outcome.rate_headers,
    )


def network_outcome(exc: Exception) -> Outcome:
    # The exception text can carry the URL; the class name says enough.
    return Outcome(
        error={"message": f"could not reach the upstream ({type(exc).__name__})", "type": "network_error"},
        retryable=True,
    )


def too_large_outcome(limit: int) -> Outcome:
    # Not retried: the same call would most likely bring the same answer again.
    return Outcome(
        error={
            "message": f"the upstream's answer is larger than MAX_RESPONSE_BYTES ({limit} bytes)",
            "type": "response_too_large",
        },
        retryable=False,
    )


def timeout_outcome(seconds: float) -> Outcome:
    return Outcome(
        error={"message": f"the upstream did not answer within {seconds:g} s", "type": "timeout"},
        retryable=True,
    )
