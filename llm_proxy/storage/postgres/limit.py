"""The networked back end's ceiling: counted in the claiming transaction (see ``queue``): a
claimed job's slot is taken until the job is finished or put back, which free it in the same
statement and wake the workers. Here, only this worker's own bound."""

from __future__ import annotations

import gevent.lock

from llm_proxy.storage.base import Claim, ConcurrencyLimit, Slot
from llm_proxy.storage.postgres.queue import PostgresJobQueue


class _LocalSlot(Slot):
    def __init__(self, semaphore: gevent.lock.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        # The shared slot is freed by the job's finish (or put-back) a moment later: one round
        # trip per job fewer than freeing it here.
        if self._held:
            self._held = False
            self._semaphore.release()


class SharedLimit(ConcurrencyLimit):
    def __init__(self, max_concurrent: int, queue: PostgresJobQueue) -> None:
        self._slots = gevent.lock.BoundedSemaphore(max_concurrent)
        queue.with_ceiling(max_concurrent)

    def free(self, timeout: float) -> int:
        if self._slots.locked():
            self._slots.wait(timeout=timeout)
        return int(self._slots.counter)

    def hold(self, claim: Claim) -> Slot:
        self._slots.acquire()
        return _LocalSlot(self._slots)
