"""A cross-process nudge from the web process to the worker: "a job was queued".

persist-queue only notices another process's put on its 10 s tick; a datagram on a Linux
abstract Unix socket named after DATA_DIR wakes the worker within a millisecond. It is only a
hint: the worker also polls, so a lost datagram (or a platform without abstract sockets) costs
latency, never a job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("llm_proxy.wakeup")


def address_for(data_dir: Path) -> str:
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data_dir))).hexdigest()[:24]
    return f"\0llm-proxy-{digest}"


class WakeupSender:
    def __init__(self, data_dir: Path) -> None:
        self._address = address_for(data_dir)
        self._sock: socket.socket | None = None
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        except (OSError, AttributeError):
            self._sock = None

    def notify(self) -> None:
        if self._sock is None:
            return
        # No worker listening yet, or its buffer full of earlier nudges: both are fine.
        with contextlib.suppress(OSError):
            self._sock.sendto(b"!", self._address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


class WakeupListener:
    """Bound by the single worker; ``wait`` returns when nudged or after the timeout."""

    def __init__(self, data_dir: Path) -> None:
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address_for(data_dir))
            self._sock = sock
        except (OSError, AttributeError) as exc:
            log.warning("no wake-up socket (%s); new jobs are picked up by polling", exc)

    @property
    def available(self) -> bool:
        return self._sock is not None

    def wait(self, timeout: float) -> bool:
        """Block (cooperatively, under gevent) until nudged; drain pending nudges. True if nudged."""
        if self._sock is None:
            return False
        self._sock.settimeout(timeout)
        try:
            self._sock.recv(16)
        except (TimeoutError, OSError):
            return False
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(16)
        except OSError:
            pass
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
