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
from typing import Generic, TypeVar

import diskcache
import gevent
import gevent.event

from llm_proxy.storage.base import StorageUnavailable

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

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


class GroupCommit(Generic[I, R]):
    """Calls from concurrent greenlets share one transaction, so one fsync covers a whole batch.

    The first caller leads: it yields once, letting greenlets that are ready add their items, then
    runs ``write`` on the batch and hands every caller its result. A call still returns only once
    its item is committed.
    """

    def __init__(self, write: Callable[[list[I]], list[R]], what: str, patience: float) -> None:
        self._write = write
        self._what = what
        self._patience = patience
        self._batch: list[tuple[I, gevent.event.AsyncResult]] = []
        self._leading = False

    def __call__(self, item: I) -> R:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._batch.append((item, result))
        if not self._leading:
            self._leading = True
            try:
                try:
                    gevent.sleep(0)
                finally:
                    # Committed even when this greenlet is killed while it yields (shutdown,
                    # cancel): the others in the batch are waiting on it.
                    while self._batch:
                        batch, self._batch = self._batch, []
                        self._commit(batch)
            finally:
                self._leading = False
        value: R = result.get()
        return value

    def _commit(self, batch: list[tuple[I, gevent.event.AsyncResult]]) -> None:
        items = [item for item, _ in batch]
        try:
            values = retrying(self._what, lambda: self._write(items), self._patience)
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, StorageUnavailable)
                else StorageUnavailable(f"{self._what}: interrupted")
            )
            for _, result in batch:
                result.set_exception(failure)
            if failure is not exc:
                raise
            return
        for (_, result), value in zip(batch, values, strict=True):
            result.set(value)
