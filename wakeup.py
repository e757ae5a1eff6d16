"""Cross-process nudges between the web process and the worker, over Linux abstract Unix datagram
sockets named after DATA_DIR.

- web -> worker ("worker" role): "a job was queued". persist-queue only notices another process's
  put on its 10 s tick; the nudge wakes the worker within a millisecond.
- worker -> web ("web" role): the request id that just reached a final state, which wakes every
  client long-polling or waiting on it, with no polling of the store per client.

Both are hints: a lost datagram (or a platform without abstract sockets) costs latency, never a
request. The worker also polls, and a waiting client reads the store when its wait ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("llm_proxy.wakeup")

CANCEL_PREFIX = b"cancel:"
"""A message to the worker that cancels the running request whose id follows."""
WORKER = "worker"
WEB = "web"
_MAX_MESSAGE = 256


def address_for(data_dir: Path, role: str = WORKER) -> str:
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:24]
    return f"\0llm-proxy-{digest}" + ("" if role == WORKER else f"-{role}")


class WakeupSender:
    def __init__(self, data_dir: Path, role: str = WORKER) -> None:
        self._address = address_for(data_dir, role)
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        except (OSError, AttributeError):
            self._sock = None

    def notify(self, message: bytes = b"!") -> None:
        if self._sock is None:
            return
        # Nobody listening yet, or its buffer full of earlier nudges: both are fine.
        with contextlib.suppress(OSError):
            self._sock.sendto(message[:_MAX_MESSAGE], self._address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


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
