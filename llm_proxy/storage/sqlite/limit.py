"""The embedded back end's concurrency ceiling: its one worker's semaphore."""

from __future__ import annotations

import gevent.lock

from llm_proxy.storage.base import Claim, ConcurrencyLimit, Slot


class _LocalSlot(Slot):
    def __init__(self, semaphore: gevent.lock.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


class LocalLimit(ConcurrencyLimit):
    def __init__(self, max_concurrent: int) -> None:
        self._slots = gevent.lock.BoundedSemaphore(max_concurrent)

    def free(self, timeout: float) -> int:
        if self._slots.locked():
            self._slots.wait(timeout=timeout)
        return int(self._slots.counter)

    def hold(self, claim: Claim) -> Slot:
        self._slots.acquire()
        return _LocalSlot(self._slots)
