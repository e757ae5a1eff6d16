"""The networked back end's notifier: LISTEN/NOTIFY, one listening connection per process.

Channels: ``llm_proxy_work`` (jobs queued; sent by the inserting transaction itself, and when a
slot frees), ``llm_proxy_cancel`` (a request id), ``llm_proxy_final`` (a request id) and
``llm_proxy_relay`` (streamed events for wait mode, in pieces under NOTIFY's 8,000-byte limit).
Notifications sent while a listener is disconnected are lost, so after every (re)connection the
listener reports a gap: workers look for work, web processes re-read what their clients wait on.
LISTEN needs a direct connection: through PgBouncer's transaction pooling it does not work.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.queue
import psycopg

from llm_proxy.storage.base import RelaySender, RelaySink, StorageUnavailable, WebSignals, WorkerSignals
from llm_proxy.storage.local import Sinks
from llm_proxy.storage.postgres.database import Database
from llm_proxy.storage.postgres.queue import WORK_CHANNEL

log = logging.getLogger("llm_proxy.postgres.signals")

CANCEL_CHANNEL = "llm_proxy_cancel"
FINAL_CHANNEL = "llm_proxy_final"
RELAY_CHANNEL = "llm_proxy_relay"
PIECE_CHARS = 1900
"""Characters of an event per notification: at most 4 bytes each, well under the 8,000-byte limit."""
_MORE, _LAST, _END = "+", "=", "."


class Listener:
    """Runs LISTEN on its own connection, reconnecting with backoff, until closed."""

    def __init__(
        self,
        database: Database,
        channels: tuple[str, ...],
        on_message: Callable[[str, str], None],
        on_gap: Callable[[], None],
    ) -> None:
        self._db = database
        self._channels = channels
        self._on_message = on_message
        self._on_gap = on_gap
        self._closed = gevent.event.Event()
        self._connection: psycopg.Connection[Any] | None = None
        self.connected = gevent.event.Event()

    def run(self) -> None:
        delay = 0.2
        while not self._closed.is_set():
            try:
                connection = self._db.direct()
            except psycopg.Error as exc:
                log.warning(
                    "cannot listen for notifications, retrying in %.1f s: %s", delay, type(exc).__name__
                )
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._connection = connection
            try:
                for channel in self._channels:
                    connection.execute(f"LISTEN {channel}")
                self.connected.set()
                delay = 0.2
                self._on_gap()
                while not self._closed.is_set():
                    for notification in connection.notifies(timeout=5.0):
                        self._on_message(notification.channel, notification.payload)
                    # A quiet connection may be a dead one (a silent drop): ask it.
                    connection.execute("SELECT 1")
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    log.warning("notification connection lost (%s); reconnecting", type(exc).__name__)
            finally:
                self.connected.clear()
                with contextlib.suppress(psycopg.Error):
                    connection.close()
                self._connection = None

    def close(self) -> None:
        self._closed.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.close()


def notify(database: Database, channel: str, payloads: list[str], what: str) -> None:
    """Best effort: a lost signal costs latency, never a request."""
    try:
        database.execute(what, "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (channel, payloads))
    except StorageUnavailable as exc:
        log.debug("%s: %s", what, exc)


class PostgresWebSignals(WebSignals):
    def __init__(self, database: Database) -> None:
        self._db = database
        self._sinks = Sinks()
        self._on_final: Callable[[str], None] = lambda request_id: None
        self._on_gap: Callable[[], None] = lambda: None
        self._listener = Listener(database, (FINAL_CHANNEL, RELAY_CHANNEL), self._received, self._gap)

    def work_queued(self) -> None:
        """Nothing to send: the transaction that queued the job notified the workers at commit."""

    def cancel(self, request_id: str) -> None:
        notify(self._db, CANCEL_CHANNEL, [request_id], "cannot signal a cancel")

    def announce_final(self, request_id: str) -> None:
        notify(self._db, FINAL_CHANNEL, [request_id], "cannot announce a final state")

    def listen_finals(
        self, on_final: Callable[[str], None], on_gap: Callable[[], None] = lambda: None
    ) -> None:
        self._on_final, self._on_gap = on_final, on_gap
        self._listener.run()

    def _gap(self) -> None:
        self._on_gap()

    def _received(self, channel: str, payload: str) -> None:
        if channel == FINAL_CHANNEL:
            self._on_final(payload)
            return
        request_id, _, rest = payload.partition("\n")
        sink = self._sinks.get(request_id)
        if sink is None or not rest:
            return
        marker, text = rest[0], rest[1:]
        if marker == _END:
            sink.queue.put(None)
        elif marker == _MORE:
            sink.partial.append(text)
        else:
            sink.partial.append(text)
            sink.queue.put("".join(sink.partial).encode("utf-8"))
            sink.partial.clear()

    def open_relay(self, request_id: str) -> RelaySink:
        return self._sinks.open(request_id)

    def close(self) -> None:
        self._listener.close()


class _Relay(RelaySender):
    def __init__(self, database: Database, request_id: str) -> None:
        self._db = database
        self._request_id = request_id
        self._broken = False

    def send(self, event: bytes) -> None:
        if self._broken:
            return
        text = event.decode("utf-8", "replace")
        pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)] or [""]
        payloads = [
            f"{self._request_id}\n{_LAST if i == len(pieces) - 1 else _MORE}{piece}"
            for i, piece in enumerate(pieces)
        ]
        try:
            # One statement: the pieces of an event arrive together and in order.
            self._db.execute(
                "cannot relay an event",
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) WITH ORDINALITY AS u(p, n) ORDER BY n",
                (RELAY_CHANNEL, payloads),
            )
        except StorageUnavailable as exc:
            log.warning("request %s: relay broken: %s", self._request_id, exc)
            self._broken = True

    def close(self) -> None:
        if not self._broken:
            notify(self._db, RELAY_CHANNEL, [f"{self._request_id}\n{_END}"], "cannot end a relay")


class PostgresWorkerSignals(WorkerSignals):
    def __init__(self, database: Database) -> None:
        self._db = database
        self._pending: list[str] = []
        self._flushing = False
        self._listener: Listener | None = None

    def listen(self, on_work: Callable[[], None], on_cancel: Callable[[str], None]) -> None:
        def received(channel: str, payload: str) -> None:
            if channel == CANCEL_CHANNEL:
                on_cancel(payload)
            else:
                on_work()

        # After a gap, look for work that was queued meanwhile.
        self._listener = Listener(self._db, (WORK_CHANNEL, CANCEL_CHANNEL), received, on_work)
        self._listener.run()

    def announce_final(self, request_id: str) -> None:
        # Queued and sent by one greenlet, many to a statement: a job never waits on it.
        self._pending.append(request_id)
        if not self._flushing:
            self._flushing = True
            gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:500], self._pending[500:]
                notify(self._db, FINAL_CHANNEL, batch, "cannot announce final states")
        finally:
            self._flushing = False

    def relay(self, request_id: str) -> RelaySender:
        return _Relay(self._db, request_id)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
