"""In-process pieces both back ends build on: a worker's own slot bound, and the registry of
wait-mode relay sinks a web process keeps (events arrive by whatever the back end's notifier is)."""

from __future__ import annotations

import gevent.lock
import gevent.queue

from llm_proxy.storage.base import Claim, ConcurrencyLimit, RelaySink, Slot


class LocalSlot(Slot):
    def __init__(self, semaphore: gevent.lock.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()


class LocalLimit(ConcurrencyLimit):
    """This worker's bound: a semaphore of ``max_concurrent`` slots."""

    def __init__(self, max_concurrent: int) -> None:
        self._slots = gevent.lock.BoundedSemaphore(max_concurrent)

    def free(self, timeout: float) -> int:
        if self._slots.locked():
            self._slots.wait(timeout=timeout)
        return int(self._slots.counter)

    def hold(self, claim: Claim) -> Slot:
        self._slots.acquire()
        return LocalSlot(self._slots)


class QueueSink(RelaySink):
    """One request's relayed events, queued as they arrive; None once the relay ended."""

    def __init__(self, sinks: Sinks, request_id: str) -> None:
        self._sinks = sinks
        self._request_id = request_id
        self.queue: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        self.partial: list[str] = []
        """Pieces of an event still incomplete (for notifiers that split events)."""

    def next(self, timeout: float) -> bytes | None:
        try:
            item: bytes | None = self.queue.get(timeout=timeout)
        except gevent.queue.Empty:
            return b""
        return item

    def wake(self) -> None:
        """Make a waiting ``next`` return b"" now, as if it had timed out: its reader looks at the
        request's status then (called when the request became final, so no timer is waited out)."""
        self.queue.put(b"")

    def close(self) -> None:
        self._sinks.discard(self._request_id, self)


class Sinks:
    """The open sinks of a web process, by request id."""

    def __init__(self) -> None:
        self._open: dict[str, QueueSink] = {}

    def open(self, request_id: str) -> QueueSink:
        sink = QueueSink(self, request_id)
        self._open[request_id] = sink
        return sink

    def get(self, request_id: str) -> QueueSink | None:
        return self._open.get(request_id)

    def discard(self, request_id: str, sink: QueueSink) -> None:
        if self._open.get(request_id) is sink:
            del self._open[request_id]
