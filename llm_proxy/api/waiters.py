"""Clients waiting for requests to reach a final state, in a web process.

One greenlet listens to the back end's "this request is final" signals and wakes every client
waiting on that id: a long-poll or a wait-mode submit costs no store polling per client.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import gevent
import gevent.event

from llm_proxy.storage.base import WebSignals


class Waiters:
    def __init__(self) -> None:
        self._events: dict[str, gevent.event.Event] = {}
        self._watchers: Counter[str] = Counter()
        self._listening: gevent.Greenlet[..., None] | None = None

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[gevent.event.Event]:
        """An event set when the request becomes final. Watch before reading its status, so a
        notification arriving in between is not missed."""
        event = self._watch(request_id)
        try:
            yield event
        finally:
            self._unwatch(request_id)

    def on_final(self, request_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (in the hub: it must not block) when the request becomes final, for
        a client that waits on something else as well (an event stream also waits on its relay).
        Returns the function that stops watching; as with ``watch``, start before reading."""
        event = self._watch(request_id)

        def fire(_: gevent.event.Event) -> None:
            callback()

        event.rawlink(fire)
        watching = True

        def stop() -> None:
            nonlocal watching
            if watching:
                watching = False
                event.unlink(fire)
                self._unwatch(request_id)

        return stop

    def _watch(self, request_id: str) -> gevent.event.Event:
        event = self._events.setdefault(request_id, gevent.event.Event())
        self._watchers[request_id] += 1
        return event

    def _unwatch(self, request_id: str) -> None:
        self._watchers[request_id] -= 1
        if self._watchers[request_id] <= 0:
            del self._watchers[request_id]
            self._events.pop(request_id, None)

    def wake(self, request_id: str) -> None:
        event = self._events.get(request_id)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        """Announcements may have been missed: every waiter reads its request's status again."""
        for event in self._events.values():
            event.set()

    def start(self, signals: WebSignals) -> None:
        """Wake waiters as the back end announces final states. Without it, waits simply last
        their full time and then read the store."""
        self._listening = gevent.spawn(signals.listen_finals, self.wake, self.wake_all)

    def close(self) -> None:
        if self._listening is not None:
            self._listening.kill()

    def __len__(self) -> int:
        return len(self._events)
