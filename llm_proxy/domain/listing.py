"""A request as the dashboard lists it: the few fields a back end indexes per request, so that a
page of 50 out of 50,000 is read from an index instead of decoding stored results."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from llm_proxy.domain.endpoints import Endpoint, endpoint_of
from llm_proxy.domain.status import Status, StatusEntry

CHAT_COMPLETIONS = Endpoint.CHAT.path
ENDPOINTS: tuple[str, ...] = tuple(endpoint.path for endpoint in Endpoint)
"""The endpoints whose requests are queued (and so listed), as listed: their paths."""


def listed_endpoint(request_id: str) -> str:
    """The endpoint a request is listed under: its id's (``endpoint_of``), as a path."""
    return endpoint_of(request_id).path


def id_condition(path: str) -> str:
    """An SQL condition (the same for both back ends) true of the rows whose ``request_id`` was
    issued for the endpoint at ``path``: read from the id's prefix as ``endpoint_of`` reads it, so
    that rows indexed before the endpoint was recorded are selected too. False for other paths."""
    wanted = next((endpoint for endpoint in Endpoint if endpoint.path == path), None)
    if wanted is None:
        return "1 = 0"

    def prefixed(endpoint: Endpoint) -> str:
        # The prefixes are constants of ``Endpoint`` (letters and underscores): safe to inline.
        return f"substr(request_id, 1, {len(endpoint.prefix)}) = '{endpoint.prefix}'"

    if wanted is Endpoint.CHAT:
        # Chat is every id without another endpoint's prefix, as ``endpoint_of`` has it.
        return "NOT (" + " OR ".join(prefixed(e) for e in Endpoint if e is not Endpoint.CHAT) + ")"
    return prefixed(wanted)


RECENT_LATENCIES = 1000
"""Upstream latency percentiles are computed over at most this many of the latest calls."""


@functools.lru_cache(maxsize=32)
def model_of(request_json: str) -> str | None:
    """The ``model`` of a stored request body. Cached: the worker stores three or more statuses for
    each request with the same body text (whose hash Python keeps), and decoding a large body on
    each would cost the worker a measurable share of its time; the cache is small because each
    entry pins a body."""
    try:
        body = json.loads(request_json)
    except ValueError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return str(model)[:200] if model is not None else None


@dataclass(frozen=True, kw_only=True)
class Listed:
    request_id: str
    owner: str
    status: Status
    submitted_at: int
    """Milliseconds since the epoch."""
    endpoint: str = CHAT_COMPLETIONS
    model: str | None = None
    attempts: int = 0
    error_type: str | None = None
    finished_at: int | None = None
    """Milliseconds since the epoch, once final."""
    upstream_ms: int | None = None
    """Duration of the latest upstream call that ended."""
    webhook: str | None = None
    """The webhook's state (``WebhookState``) when one is owed."""
    changed_at: int = 0
    """The entry's ``timestamp``: an index never replaces a row with an older one."""

    @classmethod
    def of(cls, request_id: str, entry: StatusEntry) -> Listed:
        ended = [a.duration_ms for a in entry.history if a.duration_ms is not None]
        error_type = (entry.error or {}).get("type")
        return cls(
            request_id=request_id,
            owner=entry.owner,
            status=entry.status,
            # Entries stored before ``submitted_at`` existed: their latest change is the best guess.
            submitted_at=entry.submitted_at if entry.submitted_at is not None else entry.timestamp,
            endpoint=listed_endpoint(request_id),
            model=model_of(entry.request_json),
            attempts=entry.attempts_made,
            error_type=None if error_type is None else str(error_type)[:100],
            finished_at=entry.timestamp if entry.status.final else None,
            upstream_ms=ended[-1] if ended else None,
            webhook=entry.webhook.state.value if entry.webhook is not None else None,
            changed_at=entry.timestamp,
        )

    def duration_ms(self, now_ms: int) -> int:
        """From submit to the end, or to now while it runs."""
        return max(0, (self.finished_at if self.finished_at is not None else now_ms) - self.submitted_at)


@dataclass(frozen=True, kw_only=True)
class Summary:
    """One owner's recent activity, for the dashboard's overview."""

    per_minute: dict[int, tuple[int, int]]
    """Minute (milliseconds since the epoch, floored to the minute) -> (completed, failed)."""
    latencies_ms: list[int]
    """Upstream durations of up to ``RECENT_LATENCIES`` of the latest finished requests."""
    webhooks_pending: int
    webhooks_failed: int

    @property
    def completed(self) -> int:
        return sum(done for done, _ in self.per_minute.values())

    @property
    def failed(self) -> int:
        return sum(failed for _, failed in self.per_minute.values())
