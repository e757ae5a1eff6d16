"""The embedded webhook outbox: a job queue of its own (in ``DATA_DIR/outbox``), used as a plain
durable list. Its one sender is the worker, which holds the back end's consumer lock."""

from __future__ import annotations

import math
from pathlib import Path

from llm_proxy.domain.job import Job
from llm_proxy.storage.base import Claim, Delivery, Outbox, OwedDelivery
from llm_proxy.storage.sqlite.queue import PersistJobQueue

_HOLDER = "webhook-sender"
_LEASE_SECONDS = 365 * 24 * 3600.0
"""Taken deliveries are owed again only by ``recover``, which the one sender calls at its start."""


class SqliteOutbox(Outbox):
    def __init__(self, directory: Path) -> None:
        self._queue = PersistJobQueue(directory)
        self._taken: dict[int, Claim] = {}

    def owe(self, delivery: Delivery) -> None:
        # Stored in the format earlier versions used, so owed deliveries survive an upgrade.
        self._queue.put(
            Job(
                request_id=delivery.request_id,
                owner=delivery.owner,
                body={"url": delivery.url, "body": delivery.payload, "webhook_id": delivery.webhook_id},
            )
        )

    def take(self, limit: int, *, hold: float) -> list[OwedDelivery]:
        # One sender at a time (the back end's lock), so a taken delivery stays taken until that
        # sender is gone: ``recover`` hands its deliveries to the next one.
        owed = []
        for claim in self._queue.claim_many(limit, holder=_HOLDER, lease_seconds=_LEASE_SECONDS):
            self._taken[claim.ticket] = claim
            body = claim.job.body
            delivery = Delivery(
                request_id=claim.job.request_id, owner=claim.job.owner, url=body["url"], payload=body["body"]
            )
            owed.append(OwedDelivery(claim.ticket, delivery))
        return owed

    def keep(self, owed: list[OwedDelivery], *, hold: float) -> set[int]:
        """Nothing to extend, and nobody to lose a delivery to: see ``take``."""
        return {o.ticket for o in owed}

    def done(self, owed: OwedDelivery) -> None:
        claim = self._taken.get(owed.ticket)
        if claim is not None:
            self._queue.ack(claim)
            del self._taken[owed.ticket]

    def recover(self) -> int:
        return self._queue.requeue_lapsed(math.inf)

    def compact(self) -> int:
        return self._queue.compact()

    def close(self) -> None:
        self._queue.close()
