"""The embedded back end's relay of streamed events: a worker makes the streamed upstream call
and passes each event to the web process over a per-request Unix stream connection
(``RelayClient`` -> ``RelayServer``); the web writes them to the waiting client."""

from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

from gevent.server import StreamServer

from llm_proxy.storage.base import RelaySender, RelaySink
from llm_proxy.storage.local import Sinks
from llm_proxy.storage.sqlite.addresses import RELAY, address_for

log = logging.getLogger("llm_proxy.relay")


class RelayServer:
    """In the web process: accepts the worker's relay connections, one per streamed request."""

    def __init__(self, data_dir: Path) -> None:
        self._sinks = Sinks()
        self._server: StreamServer | None = None
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address_for(data_dir, RELAY))
            listener.listen(128)
            self._server = StreamServer(listener, self._handle)
        except OSError as exc:
            log.warning("no relay socket (%s); streamed answers arrive whole", exc)

    def start(self) -> None:
        if self._server is not None:
            self._server.start()

    def open(self, request_id: str) -> RelaySink:
        return self._sinks.open(request_id)

    def _handle(self, connection: socket.socket, _address: Any) -> None:
        reader = connection.makefile("rb")
        sink = None
        try:
            request_id = reader.readline(256).strip().decode("ascii", "replace")
            sink = self._sinks.get(request_id)
            for line in iter(reader.readline, b""):
                if sink is not None:
                    sink.queue.put(line)
        except OSError:
            pass
        finally:
            if sink is not None:
                sink.queue.put(None)
            reader.close()
            connection.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)


class RelayClient(RelaySender):
    """In the worker: opens the relay connection of one request on its first event."""

    def __init__(self, data_dir: Path, request_id: str) -> None:
        self._address = address_for(data_dir, RELAY)
        self._request_id = request_id
        self._sock: socket.socket | None = None
        self._broken = False

    def send(self, event: bytes) -> None:
        """Best effort: a client that went away must not stop the request itself."""
        if self._broken:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(10)
                self._sock.connect(self._address)
                self._sock.sendall(self._request_id.encode("ascii") + b"\n")
            self._sock.sendall(event)
        except OSError:
            self._broken = True
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
