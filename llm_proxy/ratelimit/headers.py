"""What the upstream reports about its rate limits, parsed from an answer's headers. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llm_proxy.upstream.outcome import parse_retry_after

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(raw: str | None) -> float | None:
    """Seconds in a Go-style duration as OpenAI sends them (``1s``, ``6m0s``, ``20ms``,
    ``1h2m3.5s``); a bare number counts as seconds. None when it is not one."""
    if raw is None:
        return None
    text = raw.strip().lower()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if value >= 0 and value != float("inf") else None
    total, position = 0.0, 0
    for match in _PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def _count(headers: Any, name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(float(str(raw).strip()))
    except (ValueError, OverflowError):  # not a number, NaN, infinite
        return None
    return value if value >= 0 else None


def _limit(headers: Any, name: str) -> int | None:
    # A limit of 0 says nothing about how a budget refills (and would be divided by).
    value = _count(headers, name)
    return value if value is not None and value > 0 else None


@dataclass(frozen=True, kw_only=True)
class RateReport:
    """One answer's x-ratelimit-* headers (None where absent or unreadable)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    """Seconds until the request budget is whole again."""
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    retry_after: float | None = None
    """Seconds, from ``retry-after-ms`` or ``Retry-After``."""

    @property
    def empty(self) -> bool:
        return self == RateReport()


def read_report(headers: Any) -> RateReport:
    """The rate-limit headers of an answer (``headers`` needs only a case-insensitive ``get``)."""
    if headers is None:
        return RateReport()
    return RateReport(
        limit_requests=_limit(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_count(headers, "x-ratelimit-remaining-requests"),
        reset_requests=parse_duration(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=_limit(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_count(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens=parse_duration(headers.get("x-ratelimit-reset-tokens")),
        retry_after=parse_retry_after(headers),
    )
