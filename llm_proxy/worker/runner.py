"""Running one claimed job: its attempts, its final status, or putting it back.

The runner knows nothing of HTTP nor of how jobs are claimed: it gets a claim and a slot, talks to
the upstream, writes statuses and hands the end to the ``Finalizer``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import gevent
import gevent.event

from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.domain.job import Job, now_ms
from llm_proxy.domain.status import Attempt, Status, StatusEntry
from llm_proxy.observability.metrics import Metrics
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import Claim, JobQueue, RelaySender, Slot, StatusStore, StorageUnavailable
from llm_proxy.upstream.outcome import Outcome
from llm_proxy.worker.pacing import Limiter, model_of
from llm_proxy.worker.retry import Finish, RetryAfter, RetryPolicy, decide, exhausted_by_crashes

log = logging.getLogger("llm_proxy.worker")

FINISH_RETRY_FIRST = 0.2
FINISH_RETRY_MAX = 5.0


class Upstream(Protocol):
    def complete(self, body: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> Outcome: ...

    def stream(
        self, body: dict[str, Any], on_event: Callable[[bytes], None], endpoint: Endpoint = Endpoint.CHAT
    ) -> Outcome: ...


class Cancelled(Exception):
    """Raised inside a job's greenlet when its cancellation arrives."""


class GracefulStop(Exception):
    """Raised inside a job's greenlet when shutdown's deadline passes: the job is put back."""


class LeaseLost(Exception):
    """Raised inside a job's greenlet when its lease is no longer current: another worker may
    hold the job now, so this one stops without writing anything."""


def entry_for(job: Job, status: Status, **fields: Any) -> StatusEntry:
    return StatusEntry(
        status=status,
        request_json=job.body_json,
        owner=job.owner,
        timestamp=now_ms(),
        submitted_at=job.submitted_at or None,
        **fields,
    )


def closed(history: tuple[Attempt, ...], outcome: str) -> tuple[Attempt, ...]:
    """The history with an attempt still marked running ended as ``outcome`` now: its call was
    cut short (cancelled, or its worker died during it)."""
    return tuple(a.ended(outcome, now_ms()) if a.duration_ms is None else a for a in history)


class JobRunner:
    def __init__(
        self,
        *,
        queue: JobQueue,
        statuses: StatusStore,
        upstream: Upstream,
        finalizer: Finalizer,
        policy: RetryPolicy,
        stopping: gevent.event.Event,
        relay: Callable[[str], RelaySender] | None = None,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Any] = gevent.sleep,
        limiter: Limiter | None = None,
    ) -> None:
        self._queue = queue
        self._statuses = statuses
        self._upstream = upstream
        self._finalizer = finalizer
        self._policy = policy
        self._stopping = stopping
        self._relay = relay
        self._metrics = metrics
        self._sleep = sleep
        self._limiter = limiter
        # Requests whose greenlet may be killed by a cancel right now (calling the upstream or
        # waiting to retry), and cancels that arrived when it could not be.
        self._interruptible: set[str] = set()
        self._cancels: set[str] = set()
        # Requests whose claim stored their first attempt (``opening``) and whose call has not
        # begun: stopped or cancelled now, that attempt does not count.
        self._unbegun: set[str] = set()

    def cancel(self, request_id: str) -> bool:
        """Record a cancel for a job running here. True when its greenlet may be killed with
        ``Cancelled`` now; otherwise the job stops at its next call or retry, or ends as it was
        about to (a result being stored is not thrown away)."""
        self._cancels.add(request_id)
        return request_id in self._interruptible

    @staticmethod
    def opening(job: Job, started_at: int) -> StatusEntry:
        """The status of a job's first attempt, which a claim may store (``JobQueue.claim_many``)."""
        return entry_for(job, Status.PROCESSING, attempts=1, history=(Attempt(started_at=started_at),))

    def run(self, claim: Claim, slot: Slot) -> None:
        """Run the job to its end (or put it back); the slot is given back as soon as the last
        upstream call is answered, so bookkeeping never delays the next call."""
        job = claim.job
        try:
            self._process(claim, slot)
        except GracefulStop:
            self._put_back(claim)
        except LeaseLost:
            log.warning("request %s: lease lost; left to its new holder", job.request_id)
        except Cancelled:
            slot.release()
            attempts, history = self._counted(claim, self._statuses.get(job.request_id))
            self._finish(claim, Status.CANCELLED, attempts=attempts, history=closed(history, "cancelled"))
        except StorageUnavailable as exc:
            log.error("request %s: storage failed, it will be retried: %s", job.request_id, exc)
            self._release_when_possible(claim)
        except Exception:
            log.exception("request %s: unexpected failure", job.request_id)
            current = self._statuses.get(job.request_id)
            if current is not None and current.status.final:
                # It failed after its result was stored: that result stands.
                self._queue.ack(claim)
                return
            self._finish(
                claim,
                Status.ERROR,
                error={
                    "message": "the proxy failed while processing the request",
                    "type": "internal_error",
                    "attempts": self._counted(claim, self._statuses.get(job.request_id))[0],
                },
            )
        finally:
            slot.release()
            if self._limiter is not None:
                self._limiter.forget(job.request_id)
            self._cancels.discard(job.request_id)
            self._interruptible.discard(job.request_id)
            self._unbegun.discard(job.request_id)

    def _process(self, claim: Claim, slot: Slot) -> None:
        job = claim.job
        if claim.opened_at is not None:
            self._unbegun.add(job.request_id)
        if claim.cancel_requested:
            raise Cancelled
        # A job handed out for the first time cannot have a status yet.
        entry = None if claim.fresh else self._statuses.get(job.request_id)
        if entry is not None and entry.status.final:
            self._finalizer.complete_redelivered(claim, entry)
            return
        attempts = entry.attempts_made if entry else 0
        # Each attempt's start, duration and outcome, for the dashboard; one left running by a
        # worker that died during its call ends as interrupted.
        history = closed(entry.history, "interrupted") if entry else ()
        ended = exhausted_by_crashes(attempts, self._policy)
        while ended is None:
            if job.request_id in self._cancels:
                raise Cancelled
            permit = None
            if self._limiter is not None:
                admitted = self._limiter.before_call(job)
                if isinstance(admitted, float):
                    # Held back by a rate limit, maybe someone else's 429: no attempt is spent.
                    self._hold_back(claim, slot, attempts, history, admitted)
                    return
                permit = admitted
            attempts += 1
            if attempts == 1 and claim.opened_at is not None:
                # Stored with the claim (``opening``).
                attempt = Attempt(started_at=claim.opened_at)
            else:
                attempt = Attempt(started_at=now_ms())
                # Stored before the call, so a crash during it counts as an attempt.
                self._statuses.put(
                    job.request_id,
                    entry_for(job, Status.PROCESSING, attempts=attempts, history=(*history, attempt)),
                    claim=claim,
                )
            started = time.monotonic()
            try:
                with self._cancellable(job.request_id):
                    self._unbegun.discard(job.request_id)
                    outcome = self._call(job)
            except GracefulStop:
                # A call cut short by shutdown does not count against the request.
                self._statuses.put(
                    job.request_id,
                    entry_for(job, Status.PENDING, attempts=attempts - 1, history=history),
                    claim=claim,
                )
                raise
            if self._limiter is not None and permit is not None:
                self._limiter.after_call(permit, outcome)
            kind = "success" if outcome.ok else str(outcome.error.get("type", "error"))
            history = (*history, attempt.ended("ok" if outcome.ok else kind, now_ms()))
            if self._metrics is not None:
                self._metrics.attempted(kind, time.monotonic() - started, job.endpoint.value)
            decision = decide(attempts, outcome, self._policy)
            if isinstance(decision, RetryAfter):
                log.info(
                    "request %s: attempt %d failed (%s), retrying in %.2f s",
                    job.request_id,
                    attempts,
                    outcome.error.get("type"),
                    decision.delay,
                )
                if self._queue.cancel_requested(job.request_id):
                    raise Cancelled
                cooling = self._limiter.cooling_until(model_of(job.body)) if self._limiter else None
                if outcome.status == 429 and cooling is not None:
                    # The model is paused for everybody: the retry waits in the queue, at its
                    # place, not in a slot another model could use.
                    self._hold_back(claim, slot, attempts, history, cooling)
                    return
                # The failed attempt shows while the retry waits.
                self._statuses.put(
                    job.request_id,
                    entry_for(job, Status.PROCESSING, attempts=attempts, history=history),
                    claim=claim,
                )
                with self._cancellable(job.request_id):
                    self._sleep(decision.delay)
                continue
            slot.release()
            self._end(claim, decision, attempts, history)
            return
        self._end(claim, ended, None, history)

    def _hold_back(
        self, claim: Claim, slot: Slot, attempts: int, history: tuple[Attempt, ...], until: float
    ) -> None:
        """Back among the waiting jobs, at its place, showing until when a limit holds it."""
        job = claim.job
        if self._limiter is not None:
            self._limiter.held_back(model_of(job.body), until)
        log.debug("request %s: rate limit, waits until %.3f", job.request_id, until)
        self._statuses.put(
            job.request_id,
            entry_for(
                job, Status.PENDING, attempts=attempts, history=history, throttled_until=int(until * 1000)
            ),
            claim=claim,
        )
        slot.release()
        self._queue.release(claim)

    @contextlib.contextmanager
    def _cancellable(self, request_id: str) -> Iterator[None]:
        """While inside, a cancel kills the job's greenlet at once."""
        if request_id in self._cancels:
            raise Cancelled
        self._interruptible.add(request_id)
        try:
            yield
        finally:
            self._interruptible.discard(request_id)

    def _end(self, claim: Claim, ended: Finish, attempts: int | None, history: tuple[Attempt, ...]) -> None:
        if ended.status is Status.COMPLETED:
            self._finish(
                claim, ended.status, response_json=ended.response_json, attempts=attempts, history=history
            )
        else:
            self._finish(claim, ended.status, error=ended.error, history=history)

    def _call(self, job: Job) -> Outcome:
        if not (job.relay and self._relay is not None):
            return self._upstream.complete(job.body, job.endpoint)
        relay = self._relay(job.request_id)
        try:
            return self._upstream.stream(job.body, relay.send, job.endpoint)
        finally:
            relay.close()

    def _finish(self, claim: Claim, status: Status, **fields: Any) -> None:
        """Store the end, retrying while the store is unavailable: the result (a paid upstream
        answer, say) is kept rather than the job run again. Retries end when the lease is lost
        (the dispatcher then kills this greenlet) or the worker stops."""
        entry = entry_for(claim.job, status, **fields)
        delay = FINISH_RETRY_FIRST
        while True:
            try:
                self._finalizer.finish(
                    claim.job.request_id, entry, webhook_url=claim.job.webhook_url, claim=claim
                )
                return
            except StorageUnavailable as exc:
                if self._stopping.is_set():
                    raise
                log.warning("request %s: cannot store its end yet, retrying: %s", claim.job.request_id, exc)
                self._stopping.wait(delay)
                delay = min(delay * 2, FINISH_RETRY_MAX)

    def _counted(self, claim: Claim, entry: StatusEntry | None) -> tuple[int, tuple[Attempt, ...]]:
        """The attempts and history of ``entry`` that count: without the attempt this claim
        stored (``opening``) when its call never began."""
        if entry is None:
            return 0, ()
        attempts, history = entry.attempts_made, entry.history
        opened = claim.opened_at
        if (
            claim.job.request_id in self._unbegun
            and opened is not None
            and history
            and history[-1] == Attempt(started_at=opened)
        ):
            return max(0, attempts - 1), history[:-1]
        return attempts, history

    def _put_back(self, claim: Claim) -> None:
        job = claim.job
        try:
            entry = self._statuses.get(job.request_id)
            if entry is None or entry.status is not Status.PENDING:
                attempts, history = self._counted(claim, entry)
                self._statuses.put(
                    job.request_id,
                    entry_for(job, Status.PENDING, attempts=attempts, history=history),
                    claim=claim,
                )
            self._queue.release(claim)
        except StorageUnavailable as exc:
            log.error(
                "request %s: could not put it back; it waits again at the next start: %s", job.request_id, exc
            )

    def _release_when_possible(self, claim: Claim) -> None:
        """Hand the job back once the store works again. Should the worker stop first, the claim's
        lease lapses and the job waits again then."""
        delay = 1.0
        job = claim.job
        while not self._stopping.wait(delay):
            try:
                if job.request_id in self._unbegun:
                    # The attempt its claim stored never called: it does not count.
                    attempts, history = self._counted(claim, self._statuses.get(job.request_id))
                    self._statuses.put(
                        job.request_id,
                        entry_for(job, Status.PENDING, attempts=attempts, history=history),
                        claim=claim,
                    )
                self._queue.release(claim)
                return
            except StorageUnavailable:
                delay = min(delay * 2, 30.0)
