"""Webhook delivery: the worker drains the durable outbox, retrying on a fixed schedule.

The final status (with ``webhook.state = pending``) and the owed delivery are stored before the
job is acked, so a crash anywhere in between ends with the delivery still owed. Each delivery runs
in its own greenlet, and none of it takes one of the ``MAX_CONCURRENT`` upstream slots. A send
takes a slot of its destination (host:port) first, then one of the ``WEBHOOK_CONCURRENCY`` shared
ones, so a receiver that never answers fills at most its destination's share of them and delays
deliveries to others by nothing. Progress is written to the status entry's ``webhook`` object,
where users can see why a webhook did not arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from llm_proxy.domain.status import StatusEntry, WebhookProgress, WebhookState
from llm_proxy.observability.metrics import Metrics
from llm_proxy.services.draining import next_batch
from llm_proxy.storage.base import Outbox, OwedDelivery, StatusStore, StorageUnavailable
from llm_proxy.webhooks.sender import Attempt

log = logging.getLogger("llm_proxy.webhooks")

SCHEDULE = (1, 6, 24, 120, 360)
"""Waits between attempts, in multiples of WEBHOOK_RETRY_BASE (5 s, 30 s, 2 min, 10 min, 30 min)."""
JITTER = 0.2
RETRY_AFTER_CAP = 3600.0
DESTINATION_SHARE = 4
"""One destination sends on at most 1/DESTINATION_SHARE of WEBHOOK_CONCURRENCY's slots (at least
one): it takes four slow destinations at once to fill them all (8 of the default 32 each), while a
busy fast receiver still gets several connections in parallel."""


def destination(url: str) -> str:
    """What a per-destination limit counts: the host and port a delivery connects to."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def destination_slots(concurrency: int) -> int:
    return max(1, concurrency // DESTINATION_SHARE)


@dataclasses.dataclass
class _Destination:
    slots: gevent.lock.BoundedSemaphore
    users: int = 0
    """Deliveries sending to it or waiting for one of its slots; at 0 it is forgotten."""


def retry_delay(failures: int, base: float, retry_after: float | None, rand: random.Random) -> float | None:
    """Wait before the next attempt after ``failures`` failed ones; None when it is time to give up."""
    if failures > len(SCHEDULE):
        return None
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return base * SCHEDULE[failures - 1] * rand.uniform(1 - JITTER, 1 + JITTER)


def after_attempt(
    progress: WebhookProgress, attempt: Attempt, base: float, rand: random.Random, now: float
) -> WebhookProgress:
    """The progress once ``attempt`` is made: delivered, failed for good, or a retry scheduled."""
    attempts = progress.attempts + 1
    delay = (
        None if attempt.delivered or attempt.final else retry_delay(attempts, base, attempt.retry_after, rand)
    )
    if delay is None:
        state = WebhookState.DELIVERED if attempt.delivered else WebhookState.FAILED
        next_at = None
    else:
        state, next_at = WebhookState.PENDING, int((now + delay) * 1000)
    return WebhookProgress(
        state=state,
        attempts=attempts,
        last_status=attempt.status,
        last_error=attempt.error,
        next_attempt_at=next_at,
    )


class Sender(Protocol):
    def send(self, url: str, webhook_id: str, body: str) -> Attempt: ...


class WebhookDeliverer:
    def __init__(
        self,
        *,
        outbox: Outbox,
        statuses: StatusStore,
        sender: Sender,
        retry_base: float,
        concurrency: int,
        poll_interval: float = 1.0,
        hold: float = 60.0,
        rand: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._outbox = outbox
        self._statuses = statuses
        self._sender = sender
        self._retry_base = retry_base
        self._sending = gevent.lock.BoundedSemaphore(concurrency)
        self._per_destination = destination_slots(concurrency)
        # Only destinations with a send under way or waiting: memory follows the work in hand,
        # not every host ever seen.
        self._destinations: dict[str, _Destination] = {}
        self._poll_interval = poll_interval
        self._hold = hold
        self._rand = rand or random.Random()  # noqa: S311 - jitter, not secrets
        self._metrics = metrics
        self._group = gevent.pool.Group()
        self._active: set[str] = set()
        # Deliveries taken and not yet done: kept this sender's while it works on them.
        self._taken: dict[int, OwedDelivery] = {}
        self._senders: dict[int, gevent.Greenlet[..., None]] = {}
        self._nudged = gevent.event.Event()
        self._stopping = gevent.event.Event()

    def nudge(self) -> None:
        """A delivery was just owed: look at the outbox now rather than at the next poll."""
        self._nudged.set()

    def stop(self) -> None:
        """Stop sending. Unfinished deliveries stay in the outbox and resume on the next start."""
        self._stopping.set()
        self._nudged.set()
        self._group.kill(block=True, timeout=5)

    def run(self) -> None:
        recovered = self._outbox.recover()
        if recovered:
            log.info("%d webhook delivery(ies) resumed", recovered)
        keeper = gevent.spawn(self._keep_taken)
        try:
            while not self._stopping.is_set():
                batch = next_batch(
                    lambda: self._outbox.take(100, hold=self._hold),
                    nudged=self._nudged,
                    stopping=self._stopping,
                    poll_interval=self._poll_interval,
                    what="webhook deliveries",
                )
                for owed in batch:
                    self._taken[owed.ticket] = owed
                    self._senders[owed.ticket] = self._group.spawn(self._deliver, owed)
        finally:
            keeper.kill()

    def _keep_taken(self) -> None:
        """Every third of the hold, the deliveries under way (waiting for their next attempt
        included) stay this sender's; a sender that dies stops keeping them, and another one
        takes them up when the hold is over."""
        while not self._stopping.wait(self._hold / 3):
            working = list(self._taken.values())
            try:
                held = self._outbox.keep(working, hold=self._hold)
            except StorageUnavailable as exc:
                log.warning("cannot keep webhook deliveries; retrying: %s", exc)
                continue
            for owed in working:
                sender = self._senders.get(owed.ticket)
                if owed.ticket not in held and sender is not None and owed.ticket in self._taken:
                    # Cut off longer than the hold: another sender took it up and sends it now.
                    log.warning("webhook for %s: taken up by another sender", owed.delivery.request_id)
                    sender.kill(block=False)

    def _deliver(self, owed: OwedDelivery) -> None:
        request_id = owed.delivery.request_id
        try:
            if request_id in self._active:
                # A second copy of a delivery already under way (owed again after a crash).
                self._outbox.done(owed)
                return
            self._active.add(request_id)
            try:
                self._deliver_one(owed)
            finally:
                self._active.discard(request_id)
        except StorageUnavailable as exc:
            log.error("webhook for %s: storage failed; it is taken up again later: %s", request_id, exc)
        finally:
            self._taken.pop(owed.ticket, None)
            self._senders.pop(owed.ticket, None)

    def _deliver_one(self, owed: OwedDelivery) -> None:
        delivery = owed.delivery
        entry = self._statuses.get(delivery.request_id)
        progress = (entry.webhook if entry else None) or WebhookProgress()
        while progress.state is WebhookState.PENDING:
            if progress.next_attempt_at is not None:
                wait = progress.next_attempt_at / 1000.0 - time.time()
                if wait > 0:
                    gevent.sleep(wait)
            with self._slot(delivery.url):
                attempt = self._sender.send(delivery.url, delivery.webhook_id, delivery.payload)
            progress = after_attempt(progress, attempt, self._retry_base, self._rand, time.time())
            self._record(delivery.request_id, progress)
            if progress.state is WebhookState.PENDING:
                log.info(
                    "webhook for %s: attempt %d failed (%s), next in %.1f s",
                    delivery.request_id,
                    progress.attempts,
                    attempt.error,
                    (progress.next_attempt_at or 0) / 1000.0 - time.time(),
                )
                continue
            if self._metrics is not None:
                self._metrics.delivered(progress.state.value)
            log.info(
                "webhook for %s: %s after %d attempt(s)%s",
                delivery.request_id,
                progress.state.value,
                progress.attempts,
                f" ({attempt.error})" if attempt.error else "",
            )
        self._outbox.done(owed)

    @contextlib.contextmanager
    def _slot(self, url: str) -> Iterator[None]:
        """A slot of the URL's destination, then a shared one. In that order: a delivery that waits
        for its busy destination holds no shared slot that a delivery elsewhere could use."""
        key = destination(url)
        entry = self._destinations.get(key)
        if entry is None:
            entry = _Destination(gevent.lock.BoundedSemaphore(self._per_destination))
            self._destinations[key] = entry
        entry.users += 1
        try:
            with entry.slots, self._sending:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0 and self._destinations.get(key) is entry:
                del self._destinations[key]

    def _record(self, request_id: str, progress: WebhookProgress) -> None:
        """Only the ``webhook`` field changes, atomically: nothing else written meanwhile is lost.
        When the result expired, the delivery goes on without a place to report."""

        def change(entry: StatusEntry) -> StatusEntry:
            return dataclasses.replace(entry, webhook=progress)

        self._statuses.update(request_id, change)
