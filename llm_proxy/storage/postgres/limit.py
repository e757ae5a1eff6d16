"""The networked back end's ceiling is counted in the claiming transaction (see ``queue``): a
claimed job's slot is taken while its call may run. Here, this worker's own bound on top of it, and
the slots it gave back before their jobs finished: those calls have ended, so the next claim
counts them free at once instead of waiting for the finishing commit."""

from __future__ import annotations

import gevent.lock

from llm_proxy.storage.base import Claim, Slot
from llm_proxy.storage.local import LocalLimit, LocalSlot
from llm_proxy.storage.postgres.queue import PostgresJobQueue


class _SharedSlot(LocalSlot):
    def __init__(
        self, semaphore: gevent.lock.BoundedSemaphore, claim: Claim, queue: PostgresJobQueue
    ) -> None:
        super().__init__(semaphore)
        self._claim = claim
        self._queue = queue

    def release(self) -> None:
        if self.held:
            self._queue.call_ended(self._claim)
        super().release()


class SharedLimit(LocalLimit):
    def __init__(self, max_concurrent: int, queue: PostgresJobQueue) -> None:
        super().__init__(max_concurrent)
        self._queue = queue
        queue.with_ceiling(max_concurrent)

    def hold(self, claim: Claim) -> Slot:
        self._slots.acquire()
        return _SharedSlot(self._slots, claim, self._queue)
