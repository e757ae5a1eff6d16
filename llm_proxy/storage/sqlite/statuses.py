"""The embedded status store: diskcache, one SQLite connection per process.

- diskcache keeps one connection per ``threading.local``, which gevent's patching turns into one per
  greenlet (1,000 greenlets held 1,000 open files): the cache gets the unpatched thread-local, so
  one connection serves the process (``selfcheck`` verifies the attributes this relies on).
- Its default 1 GiB size limit evicts live entries, a pending status included: eviction is off,
  and expiry alone removes entries.
- Nothing may yield to another greenlet inside ``cache.transact()``: the next writer would
  busy-wait in C and freeze the event loop.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
from gevent import monkey

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import Claim, StatusStore, StorageUnavailable
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.sqlite.requests import SqliteRequestIndex
from llm_proxy.storage.sqlite.transactions import BUSY_WAIT, OPEN_TIMEOUT, PATIENCE, retrying


class DiskcacheStatusStore(StatusStore):
    def __init__(
        self, directory: Path, *, patience: float = PATIENCE, index: SqliteRequestIndex | None = None
    ) -> None:
        self._patience = patience
        self._index = index
        try:
            self._cache = diskcache.Cache(
                str(directory),
                timeout=OPEN_TIMEOUT,
                eviction_policy="none",
                statistics=False,
                tag_index=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the status store in {directory}: {exc}") from exc
        self._cache.close()
        self._cache._local = monkey.get_original("_thread", "_local")()
        self._cache._timeout = BUSY_WAIT
        # Status writes from concurrent greenlets share one transaction.
        self._put = GroupCommit(
            self._set_all, "cannot store status", functools.partial(retrying, patience=patience)
        )

    def put(
        self, request_id: str, entry: StatusEntry, ttl: float | None = None, *, claim: Claim | None = None
    ) -> None:
        # The claim goes unchecked: the one worker's dispatcher stops a job whose lease it lost
        # before anything else can hold it.
        self._put((request_id, entry, ttl))

    def _set_all(self, items: list[tuple[str, StatusEntry, float | None]]) -> list[None]:
        with self._cache.transact(retry=False):
            for request_id, entry, ttl in items:
                self._cache.set(request_id, entry.to_dict(), expire=ttl, retry=False)
        if self._index is not None:
            # After the commit, never inside it (the index may wait on its own lock).
            self._index.record(items)
        return [None] * len(items)

    def get(self, request_id: str) -> StatusEntry | None:
        value = retrying("cannot read status", lambda: self._cache.get(request_id), self._patience)
        return StatusEntry.from_dict(value) if isinstance(value, dict) else None

    def update(
        self, request_id: str, change: Callable[[StatusEntry], StatusEntry | None]
    ) -> StatusEntry | None:
        def read_change_write() -> StatusEntry | None:
            with self._cache.transact(retry=False):
                value = self._cache.get(request_id, retry=False)
                if not isinstance(value, dict):
                    return None
                current = StatusEntry.from_dict(value)
                changed = change(current)
                if changed is None:
                    return current
                ttl = None if changed.expires_at is None else max(changed.expires_at - time.time(), 1.0)
                self._cache.set(request_id, changed.to_dict(), expire=ttl, retry=False)
                return changed

        updated = retrying("cannot update status", read_change_write, self._patience)
        if self._index is not None and updated is not None:
            ttl = None if updated.expires_at is None else updated.expires_at - time.time()
            self._index.record([(request_id, updated, ttl)])
        return updated

    def unfinished(self) -> list[str]:
        """The request ids whose entry is pending or processing.

        Only final entries are stored with an expiry, so these are the entries without one, found
        through diskcache's index on ``expire_time`` (its table layout is pinned with its version
        by ``selfcheck``) instead of decoding every stored result."""

        def read() -> list[Any]:
            return list(self._cache._sql("SELECT key FROM Cache WHERE expire_time IS NULL").fetchall())

        rows = retrying("cannot read statuses", read, self._patience)
        found = []
        for (key,) in rows:
            entry = self.get(key) if isinstance(key, str) else None
            if entry is not None and not entry.status.final:
                found.append(key)
        return found

    def purge_expired(self) -> int:
        if self._index is not None:
            self._index.purge_expired()
        return int(retrying("cannot purge statuses", self._cache.expire, self._patience))

    def close(self) -> None:
        self._cache.close()
