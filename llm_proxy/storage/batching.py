"""Calls from concurrent greenlets that share one transaction (and so one fsync), or one read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import gevent
import gevent.event

from llm_proxy.storage.base import StorageUnavailable

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class GroupCommit(Generic[I, R]):
    """Calls from concurrent greenlets share one transaction, so one fsync covers a whole batch.

    The first caller leads: it yields once, letting greenlets that are ready add their items, then
    runs ``write`` on the batch and hands every caller its result. A call still returns only once
    its item is committed. Reads use it too: one query answers every caller that asked before it
    started, never one that started earlier. ``guard`` runs the write (the embedded back end retries a locked
    database there).
    """

    def __init__(
        self,
        write: Callable[[list[I]], list[R]],
        what: str,
        guard: Callable[[str, Callable[[], list[R]]], list[R]] = lambda what, action: action(),
    ) -> None:
        self._write = write
        self._what = what
        self._guard = guard
        self._batch: list[tuple[I, gevent.event.AsyncResult]] = []
        self._leading = False

    def __call__(self, item: I) -> R:
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._batch.append((item, result))
        if not self._leading:
            self._lead()
        value: R = result.get()
        return value

    def _lead(self) -> None:
        self._leading = True
        try:
            try:
                gevent.sleep(0)
            finally:
                # Committed even when this greenlet is killed while it yields (shutdown, cancel):
                # the others in the batch are waiting on it.
                batch, self._batch = self._batch, []
                if batch:
                    self._commit(batch)
        finally:
            self._leading = False
            if self._batch:
                # Calls that arrived during the commit get a leader of their own, so that no
                # caller's answer waits on commits of items that came after its own.
                gevent.spawn(self._lead)

    def _commit(self, batch: list[tuple[I, gevent.event.AsyncResult]]) -> None:
        items = [item for item, _ in batch]
        try:
            values = self._guard(self._what, lambda: self._write(items))
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
