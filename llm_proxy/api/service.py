"""Request handling as plain Python: submit, look up, wait for and cancel requests.

No Bottle here: each method returns domain results (or raises the storage errors), and the routes
in ``app`` turn them into HTTP answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from llm_proxy.api.waiters import Waiters
from llm_proxy.domain.endpoints import endpoint_of
from llm_proxy.domain.job import Job, now_ms
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import (
    CancelResult,
    IdempotencyConflict,
    JobQueue,
    Queued,
    StatusStore,
    StorageUnavailable,
    WebSignals,
)


@dataclass(frozen=True)
class Found:
    entry: StatusEntry
    position: int | None
    """Place in line while pending (0: being taken right now); None otherwise."""


@dataclass(frozen=True)
class Accepted:
    request_id: str
    replayed: bool
    """An earlier submit with the same Idempotency-Key and body stands for this one."""


@dataclass(frozen=True)
class Place:
    status: Status
    position: int
    active: int
    """Requests in flight."""


@dataclass(frozen=True)
class Ended:
    """A cancel that came too late: the request already ended this way."""

    entry: StatusEntry


def pending_entry(queued: Queued) -> StatusEntry:
    return StatusEntry(
        status=Status.PENDING,
        request_json=queued.body_json,
        owner=queued.owner,
        timestamp=queued.submitted_at,
        attempts=0,
        throttled_until=queued.throttled_until,
    )


class RequestService:
    def __init__(
        self,
        *,
        queue: JobQueue,
        statuses: StatusStore,
        finalizer: Finalizer,
        waiters: Waiters,
        signals: WebSignals | None = None,
        max_queue: int,
        cancel_wait: float = 5.0,
    ) -> None:
        self._queue = queue
        self._statuses = statuses
        self._finalizer = finalizer
        self._waiters = waiters
        self._signals = signals
        self._max_queue = max_queue
        self._cancel_wait = cancel_wait

    def submit(self, job: Job, key: str | None) -> Accepted:
        """Queue the job (or find the request an Idempotency-Key already stands for). Raises
        QueueFull, IdempotencyConflict (also for a key used on another endpoint) and
        StorageUnavailable."""
        # The queue counts its waiting jobs in the transaction that stores this one: exact under
        # any number of concurrent submits.
        if key:
            submitted = self._queue.put_once(job, key, max_waiting=self._max_queue)
            if submitted.replayed and endpoint_of(submitted.request_id) is not job.endpoint:
                # The same body sent to another endpoint is another request (embeddings and the
                # Responses API both take {"model", "input"}): the key stands for the first one.
                raise IdempotencyConflict(submitted.request_id)
            accepted = Accepted(submitted.request_id, submitted.replayed)
        else:
            self._queue.put(job, max_waiting=self._max_queue)
            accepted = Accepted(job.request_id, replayed=False)
        if not accepted.replayed and self._signals is not None:
            self._signals.work_queued()
        return accepted

    def place(self, accepted: Accepted, found: Found | None = None) -> Place:
        """Where a request just accepted stands: as ``found`` says when given (read after a wait,
        by which time a worker may have taken it). Never raises: a store that cannot be read now
        shows as place 0."""
        if found is None and not accepted.replayed:
            try:
                # Ours is the newest waiting job (puts here do not interleave unless a locked
                # database made one wait), so its place is the waiting count; 0 once taken.
                waiting, active = self._queue.counts()
            except StorageUnavailable:
                waiting, active = 0, 0
            return Place(Status.PENDING, waiting, active)
        found = found or self.lookup_quietly(accepted.request_id)
        try:
            active = self._queue.counts().in_flight
        except StorageUnavailable:
            active = 0
        if found is None:
            return Place(Status.PENDING, 0, active)
        return Place(found.entry.status, found.position or 0, active)

    def lookup(self, request_id: str) -> Found | None:
        """The request's status and, when pending, its place in line."""
        # The worker writes a status from its first attempt on; until then the queue has it.
        entry = self._statuses.get(request_id)
        queued = self._queue.find(request_id) if entry is None or entry.status is Status.PENDING else None
        if entry is None and queued is not None:
            entry = pending_entry(queued)
        elif entry is not None and queued is not None and queued.throttled_until:
            # A rate limit found holding its model back since the worker wrote the entry.
            entry = entry.replace(throttled_until=max(entry.throttled_until or 0, queued.throttled_until))
        if entry is None:
            return None
        position = None
        if entry.status is Status.PENDING:
            position = (queued.position if queued else None) or 0
        return Found(entry, position)

    def lookup_quietly(self, request_id: str) -> Found | None:
        try:
            return self.lookup(request_id)
        except StorageUnavailable:
            return None

    def status(self, owner: str, request_id: str, wait: float) -> Found | None:
        """The owner's request, after waiting up to ``wait`` seconds for it to become final."""
        with self._waiters.watch(request_id) as became_final:
            found = self.lookup(request_id)
            if found is None or found.entry.owner != owner:
                return None
            if wait and not found.entry.status.final:
                became_final.wait(wait)
                found = self.lookup(request_id) or found
        return found

    def on_final(self, request_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (it must not block) when the request becomes final; returns the
        function that stops watching. Start before reading the status, so no final is missed."""
        return self._waiters.on_final(request_id, callback)

    def await_final(self, request_id: str, seconds: float) -> Found | None:
        """The request's status once final, or as it stands after ``seconds``."""
        with self._waiters.watch(request_id) as became_final:
            found = self.lookup_quietly(request_id)
            if found is None or not found.entry.status.final:
                became_final.wait(seconds)
                found = self.lookup_quietly(request_id) or found
        return found

    def cancel(self, owner: str, request_id: str) -> Found | Ended | None:
        """Cancel the owner's request: a waiting one ends here; a running one's worker is asked to
        abort it, and the answer waits a little for that. None when there is no such request."""
        found = self.lookup(request_id)
        if found is None or found.entry.owner != owner:
            return None
        entry = found.entry
        if entry.status in (Status.COMPLETED, Status.ERROR):
            return Ended(entry)
        if entry.status is Status.CANCELLED:
            return found
        cancelled = StatusEntry(
            status=Status.CANCELLED,
            request_json=entry.request_json,
            owner=entry.owner,
            timestamp=now_ms(),
            attempts=entry.attempts,
        )
        # Still waiting: it leaves the queue with its final status in one step.
        final = self._finalizer.finish(request_id, cancelled, webhook_url=_webhook_url(entry), withdraw=True)
        if final is not None:
            return Found(final, None)
        outcome = self._queue.cancel(request_id)
        if outcome is CancelResult.WITHDRAWN:
            # Put back among the waiting ones in the meantime (its worker stopped): ended here.
            final = self._finalizer.finish(request_id, cancelled, webhook_url=_webhook_url(entry))
            return Found(final or entry, None)
        if outcome is CancelResult.SIGNALLED:
            if self._signals is not None:
                self._signals.cancel(request_id)
            return self.await_final(request_id, self._cancel_wait) or found
        return found


def _webhook_url(entry: StatusEntry) -> str | None:
    body = json.loads(entry.request_json)
    url = body.get("webhookUrl") if isinstance(body, dict) else None
    return str(url) if url else None
