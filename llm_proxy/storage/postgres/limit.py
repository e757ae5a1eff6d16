"""The networked back end's ceiling: counted in the claiming transaction (see ``queue``); here,
this worker's own bound, and the early give-back of a slot once a job's last call is answered."""

from __future__ import annotations

import logging

import gevent.lock

from llm_proxy.storage.base import Claim, ConcurrencyLimit, Slot, StorageUnavailable
from llm_proxy.storage.postgres.queue import PostgresJobQueue

log = logging.getLogger("llm_proxy.postgres")


class _SharedSlot(Slot):
    def __init__(
        self, semaphore: gevent.lock.BoundedSemaphore, queue: PostgresJobQueue, claim: Claim
    ) -> None:
        self._semaphore = semaphore
        self._queue = queue
        self._claim = claim
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._semaphore.release()
        try:
            self._queue.give_back_slot(self._claim)
        except StorageUnavailable as exc:
            # The slot frees anyway when the job is acked or its lease lapses.
            log.warning("cannot give a slot back early: %s", exc)


class SharedLimit(ConcurrencyLimit):
    def __init__(self, max_concurrent: int, queue: PostgresJobQueue) -> None:
        self._slots = gevent.lock.BoundedSemaphore(max_concurrent)
        self._queue = queue
        queue.with_ceiling(max_concurrent)

    def free(self, timeout: float) -> int:
        if self._slots.locked():
            self._slots.wait(timeout=timeout)
        return int(self._slots.counter)

    def hold(self, claim: Claim) -> Slot:
        self._slots.acquire()
        return _SharedSlot(self._slots, self._queue, claim)
