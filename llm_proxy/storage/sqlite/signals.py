"""The embedded back end's notifier: Linux abstract Unix datagram sockets named after DATA_DIR.

- web -> worker ("worker" role): "a job was queued" (the worker otherwise polls every second), and
  "cancel this request".
- worker -> web ("web" role): the request id that just reached a final state, which wakes every
  client long-polling or waiting on it, with no polling of the store per client.

Both are hints: a lost datagram (or a platform without abstract sockets) costs latency, never a
request. The worker also polls, and a waiting client reads the store when its wait ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.lock

from llm_proxy.storage.base import RelaySender, RelaySink, WebSignals, WorkerSignals
from llm_proxy.storage.sqlite.addresses import WEB, WORKER, address_for
from llm_proxy.storage.sqlite.relay import RelayClient, RelayServer

log = logging.getLogger("llm_proxy.wakeup")

CANCEL_PREFIX = b"cancel:"
"""A message to the worker that cancels the running request whose id follows."""
_MAX_MESSAGE = 8192


class WakeupSender:
    """``patience`` 0: a nudge that finds the receiver's queue full is dropped (it is only a hint).
    Above 0: the send waits (cooperatively) that long for room, for messages that must arrive, such
    as "this request is final". Linux queues only ``net.unix.max_dgram_qlen`` datagrams (often 10)
    per socket, so a burst of completions does fill it. Sending never raises: a lost message costs
    latency, and must never fail the caller's work."""

    def __init__(self, data_dir: Path, role: str = WORKER, patience: float = 0.0) -> None:
        self._address = address_for(data_dir, role)
        self._patience = patience
        self._sock: socket.socket | None = None
        self._connected = False
        # gevent lets one greenlet at a time wait on a socket.
        self._lock = gevent.lock.Semaphore()

    def notify(self, message: bytes = b"!") -> None:
        try:
            with self._lock:
                self._send(message[:_MAX_MESSAGE])
        except Exception as exc:
            self._reset()
            log.debug("wake-up message dropped: %s", exc)

    def _send(self, message: bytes) -> None:
        if not self._connected:
            self._reset()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Connected: a full receiver queue then shows as EAGAIN for this peer alone.
            sock.connect(self._address)
            sock.setblocking(False)
            self._sock, self._connected = sock, True
        if self._sock is None:
            return
        # Waiting for room by short sleeps, not on the socket: gevent's timed socket waits were
        # measured to grow the worker's memory by ~4 MB per 1,000 messages.
        deadline = time.monotonic() + self._patience
        pause = 0.001
        while True:
            try:
                self._sock.send(message)
                return
            except BlockingIOError:
                if time.monotonic() + pause > deadline:
                    raise
                gevent.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._connected = None, False

    def close(self) -> None:
        self._reset()


class Announcer:
    """Tells the web process which requests became final, without ever making a job wait: ids
    are queued here and a single greenlet sends them, many to a datagram (newline-separated), so
    a busy reader is not flooded with one datagram per completion."""

    def __init__(self, sender: WakeupSender) -> None:
        self._sender = sender
        self._pending: list[bytes] = []
        self._flushing = False

    def announce(self, request_id: str) -> None:
        self._pending.append(request_id.encode("ascii", "replace"))
        if not self._flushing:
            self._flushing = True
            gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._pending:
                batch: list[bytes] = []
                size = 0
                while self._pending and size + len(self._pending[0]) + 1 <= _MAX_MESSAGE:
                    item = self._pending.pop(0)
                    batch.append(item)
                    size += len(item) + 1
                self._sender.notify(b"\n".join(batch))
        finally:
            self._flushing = False


class WakeupListener:
    """Bound by the one process of its role; ``receive``/``wait`` block cooperatively under gevent."""

    def __init__(self, data_dir: Path, role: str = WORKER) -> None:
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address_for(data_dir, role))
            self._sock = sock
        except (OSError, AttributeError) as exc:
            log.warning("no %s wake-up socket (%s); falling back to polling", role, exc)

    @property
    def available(self) -> bool:
        return self._sock is not None

    def receive(self, timeout: float) -> list[bytes]:
        """Every message that arrived, waiting up to ``timeout`` for the first one."""
        if self._sock is None:
            return []
        self._sock.settimeout(timeout)
        try:
            messages = [self._sock.recv(_MAX_MESSAGE)]
        except (TimeoutError, OSError):
            return []
        self._sock.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                messages.append(self._sock.recv(_MAX_MESSAGE))
        return messages

    def wait(self, timeout: float) -> bool:
        """True if nudged within ``timeout`` (pending nudges are drained)."""
        return bool(self.receive(timeout))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class EmbeddedWebSignals(WebSignals):
    """The one web process of a DATA_DIR: it binds the "web" socket and serves relays."""

    def __init__(self, data_dir: Path) -> None:
        self._nudges = WakeupSender(data_dir)
        # Cancellations must reach the worker; plain nudges may be dropped when its queue is full.
        self._cancels = WakeupSender(data_dir, patience=1.0)
        self._finals = WakeupListener(data_dir, WEB)
        self._relays = RelayServer(data_dir)
        self._relays.start()

    def work_queued(self) -> None:
        self._nudges.notify()

    def cancel(self, request_id: str) -> None:
        self._cancels.notify(CANCEL_PREFIX + request_id.encode("ascii"))

    def announce_final(self, request_id: str) -> None:
        """Nothing to do: there is no other web process on this back end."""

    def listen_finals(
        self, on_final: Callable[[str], None], on_gap: Callable[[], None] = lambda: None
    ) -> None:
        # One socket bound for the process's life: no announcement can be missed while it runs.
        while self._finals.available:
            for message in self._finals.receive(timeout=60.0):
                for request_id in message.split(b"\n"):
                    on_final(request_id.decode("ascii", "replace"))

    def open_relay(self, request_id: str) -> RelaySink:
        return self._relays.open(request_id)

    def close(self) -> None:
        self._relays.close()
        self._finals.close()
        self._nudges.close()
        self._cancels.close()


class EmbeddedWorkerSignals(WorkerSignals):
    def __init__(self, data_dir: Path, poll_interval: float = 1.0) -> None:
        self._data_dir = data_dir
        self._poll_interval = poll_interval
        self._wakeups = WakeupListener(data_dir)
        self._finals = WakeupSender(data_dir, WEB, patience=1.0)
        self._announcer = Announcer(self._finals)
        self._closed = False

    def listen(self, on_work: Callable[[], None], on_cancel: Callable[[str], None]) -> None:
        while not self._closed:
            for message in self._wakeups.receive(self._poll_interval):
                if message.startswith(CANCEL_PREFIX):
                    on_cancel(message[len(CANCEL_PREFIX) :].decode("ascii", "replace"))
                else:
                    on_work()

    def announce_final(self, request_id: str) -> None:
        self._announcer.announce(request_id)

    def relay(self, request_id: str) -> RelaySender:
        return RelayClient(self._data_dir, request_id)

    def close(self) -> None:
        self._closed = True
        self._wakeups.close()
        self._finals.close()
