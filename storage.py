"""The storage seam: a durable job queue and a status store.

The HTTP layer and the worker loop only see these two interfaces. ``sqlite_storage`` implements
them on persist-queue and diskcache for one machine; a networked back end (Redis, Postgres) is a
new pair of subclasses run against the same test suite (``tests/test_storage.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Status.COMPLETED, Status.ERROR, Status.CANCELLED)


class StorageUnavailable(Exception):
    """The back end could not durably store or read (disk full, locked, not writable)."""


class IdempotencyConflict(Exception):
    """The idempotency key was used, within the window, for a request with another body."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the key was used for request {request_id} with another body")
        self.request_id = request_id


IDEMPOTENCY_WINDOW = 24 * 3600.0
"""Seconds an idempotency key keeps pointing at its request."""


def body_digest(body: dict[str, Any]) -> str:
    """The same JSON whatever its key order or spacing gives the same digest."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, kw_only=True)
class Job:
    """What the queue carries: everything the worker needs without reading the status store."""

    request_id: str
    body: dict[str, Any]
    """The client's body exactly as sent (webhookUrl included)."""
    owner: str
    """A digest of the API key that submitted it (never the key itself)."""
    submitted_at: int = 0
    """Milliseconds since the epoch."""
    relay: bool = False
    """A client waits on the stream: the call is streamed and its events relayed to the web."""

    @functools.cached_property
    def body_json(self) -> str:
        """The body as JSON text, encoded once however many statuses are written for it."""
        return json.dumps(self.body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "body": self.body,
            "owner": self.owner,
            "submitted_at": self.submitted_at,
            "relay": self.relay,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            request_id=data["request_id"],
            body=data["body"],
            owner=data["owner"],
            submitted_at=int(data.get("submitted_at", 0)),
            relay=bool(data.get("relay", False)),
        )


@dataclass(frozen=True)
class Claim:
    ticket: int
    job: Job
    fresh: bool = False
    """Never handed out before: no earlier attempt can have left a status behind."""
    cancel_requested: bool = False


@dataclass(frozen=True, kw_only=True)
class Queued:
    """A job as ``JobQueue.find`` reports it."""

    ticket: int
    request_id: str
    owner: str
    submitted_at: int
    body_json: str
    in_flight: bool
    fresh: bool
    """Never handed out: no status can exist for it yet."""
    position: int | None
    """1-based place among the waiting jobs; None when in flight."""


class JobQueue:
    """A durable FIFO of jobs. Exactly one consumer process may claim from it."""

    def put(self, job: Job) -> int:
        """Store the job durably (on disk when this returns) and return its ticket.

        Raises StorageUnavailable when it could not be stored.
        """
        raise NotImplementedError

    def find(self, request_id: str) -> Queued | None:
        """The job with this id while it is not finished (waiting or in flight)."""
        raise NotImplementedError

    def put_once(self, job: Job, key: str) -> str:
        """Store the job unless this owner used ``key`` within ``IDEMPOTENCY_WINDOW``: then return
        that earlier request's id (same body) or raise IdempotencyConflict (another body). Returns
        the id of the request that stands for this submit. Checked and recorded atomically."""
        raise NotImplementedError

    def cancel(self, request_id: str) -> str | None:
        """Cancel a queued job in one step: ``"cancelled"`` if it was waiting (it will never be
        handed out), ``"in_flight"`` if it is claimed (the cancellation is recorded for the
        consumer: see ``cancel_requested``), None if it is not in the queue."""
        raise NotImplementedError

    def cancel_requested(self, request_id: str) -> bool:
        """Whether a cancellation was recorded for this in-flight job."""
        raise NotImplementedError

    def claim_many(self, limit: int) -> list[Claim]:
        """Take up to ``limit`` of the oldest waiting jobs without blocking, marking them in flight
        (in one step: one commit for all)."""
        raise NotImplementedError

    def claim(self) -> Claim | None:
        """Take the oldest waiting job without blocking; None if none waits."""
        claims = self.claim_many(1)
        return claims[0] if claims else None

    def ack(self, ticket: int) -> None:
        """The job reached a final state: it is never handed out again. Concurrent acks may be
        committed together."""
        raise NotImplementedError

    def release(self, ticket: int) -> None:
        """Put an in-flight job back among the waiting ones, at its old place."""
        raise NotImplementedError

    def recover(self) -> int:
        """Consumer start-up only: jobs left in flight by a dead consumer wait again. Returns how many."""
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        """(waiting, in flight), read together and counted across processes: jobs waiting to be
        claimed, and jobs claimed and not yet acked."""
        raise NotImplementedError

    def waiting(self) -> int:
        return self.counts()[0]

    def in_flight(self) -> int:
        return self.counts()[1]

    def compact(self) -> int:
        """Forget acked jobs so disk use stays bounded. Returns how many rows were dropped."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class StatusStore:
    """Status entries keyed by request id. Entries without a ttl never expire nor get evicted."""

    def put(self, request_id: str, entry: dict[str, Any], ttl: float | None = None) -> None:
        """Store (replace) the entry; with a ttl it disappears that many seconds from now."""
        raise NotImplementedError

    def get(self, request_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def purge_expired(self) -> int:
        """Delete expired entries now. Returns how many."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
