"""SQLite under gevent: short transactions, cooperative retries, and commits shared by greenlets.

SQLite's own busy wait freezes every greenlet of the process while it lasts, so it is kept at
``BUSY_WAIT`` and a locked database is retried with ``gevent.sleep`` (other greenlets keep running)
for up to ``PATIENCE`` seconds; then the failure becomes ``StorageUnavailable``, which the web
answers with 503 + Retry-After.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import diskcache
import gevent

from llm_proxy.storage.base import StorageUnavailable

T = TypeVar("T")

OPEN_TIMEOUT = 10.0
"""SQLite busy wait while opening: web and worker may create the same tables at once."""
BUSY_WAIT = 0.05
"""SQLite's own busy wait afterwards, which blocks every greenlet of the process while it lasts."""
PATIENCE = 2.0
"""How long a locked database is retried (cooperatively) before the operation fails."""


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, diskcache.Timeout) or "locked" in str(exc) or "busy" in str(exc)


def retrying(what: str, action: Callable[[], T], patience: float) -> T:
    deadline = time.monotonic() + patience
    pause = 0.005
    while True:
        try:
            return action()
        except (sqlite3.OperationalError, diskcache.Timeout) as exc:
            if not _busy(exc) or time.monotonic() + pause > deadline:
                raise StorageUnavailable(f"{what}: {exc or 'database is locked'}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"{what}: {exc}") from exc
        gevent.sleep(pause)
        pause = min(pause * 2, 0.1)


@contextlib.contextmanager
def immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on an autocommit connection: committed, or rolled back on any error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
