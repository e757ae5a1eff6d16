"""The embedded back end: everything in DATA_DIR on one machine, one worker process.

- ``queue/``: the job queue (persist-queue's SQLite table), ``outbox/``: owed webhooks;
- ``status/``: statuses (diskcache);
- Unix sockets named after DATA_DIR for signals and streamed relays;
- ``worker.lock``: only one worker may consume, since persist-queue's layout was built for one;
- the table ``llm_proxy_health`` in the queue's database: the worker's heartbeat and ``/health``'s
  write probe.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import IO

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import (
    Backend,
    Claim,
    ConcurrencyLimit,
    Delivery,
    StorageUnavailable,
    WebSignals,
    WorkerSignals,
)
from llm_proxy.storage.local import LocalLimit
from llm_proxy.storage.sqlite import selfcheck
from llm_proxy.storage.sqlite.outbox import SqliteOutbox
from llm_proxy.storage.sqlite.queue import PersistJobQueue
from llm_proxy.storage.sqlite.requests import SqliteRequestIndex
from llm_proxy.storage.sqlite.signals import EmbeddedWebSignals, EmbeddedWorkerSignals
from llm_proxy.storage.sqlite.statuses import DiskcacheStatusStore
from llm_proxy.storage.sqlite.transactions import BUSY_WAIT, OPEN_TIMEOUT, PATIENCE, retrying

LOCK_FILE = "worker.lock"
KEY_FILE = "api_key"
PROBE_KEY = "health-probe"
"""Read from the status store by the probe; shorter than any request id, so never one."""
# In the queue's database, so that the probe's write proves what a submit needs. One row for the
# worker (the lock admits one) and one for the probe.
_HEALTH_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS llm_proxy_health (name TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID"
)
_MARK = "INSERT OR REPLACE INTO llm_proxy_health VALUES (?, ?)"
# Dashboard sessions signed out before their expiry; a row goes once that expiry passes.
_SIGNED_OUT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS llm_proxy_signed_out (session TEXT PRIMARY KEY, until REAL NOT NULL)"
    " WITHOUT ROWID"
)
_LAST_BEAT = "SELECT at FROM llm_proxy_health WHERE name = 'worker'"


def _health_connection(database: Path) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(str(database), timeout=OPEN_TIMEOUT, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot open {database}: {exc}") from exc
    try:
        connection.execute(_HEALTH_SCHEMA)
        connection.execute(_SIGNED_OUT_SCHEMA)
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT * 1000)}")
        # A heartbeat lost in a power cut costs nothing: the next one comes within seconds.
        connection.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as exc:
        connection.close()
        raise StorageUnavailable(f"cannot set up {database}: {exc}") from exc
    return connection


def _locked(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class EmbeddedBackend(Backend):
    def __init__(self, data_dir: Path) -> None:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create DATA_DIR {data_dir}: {exc}") from exc
        selfcheck.check(data_dir)
        self.data_dir = data_dir
        self.queue: PersistJobQueue = PersistJobQueue(data_dir / "queue")
        try:
            # From now on a queue database lost from this DATA_DIR is noticed (selfcheck).
            selfcheck.record_identity(data_dir, self.queue.identity())
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {data_dir / selfcheck.IDENTITY_FILE}: {exc}") from exc
        # In the queue's database, where each job's row is written with the job.
        self.requests: SqliteRequestIndex = SqliteRequestIndex(data_dir / "queue" / "data.db")
        self.statuses: DiskcacheStatusStore = DiskcacheStatusStore(data_dir / "status", index=self.requests)
        self.outbox = SqliteOutbox(data_dir / "outbox")
        self._health = _health_connection(data_dir / "queue" / "data.db")
        self._lock: IO[str] | None = None
        self._signals: list[WebSignals | WorkerSignals] = []

    def web_signals(self) -> WebSignals:
        signals = EmbeddedWebSignals(self.data_dir)
        self._signals.append(signals)
        return signals

    def worker_signals(self) -> WorkerSignals:
        signals = EmbeddedWorkerSignals(self.data_dir)
        self._signals.append(signals)
        return signals

    def concurrency_limit(self, max_concurrent: int) -> ConcurrencyLimit:
        return LocalLimit(max_concurrent)

    def finish(
        self,
        request_id: str,
        entry: StatusEntry,
        *,
        ttl: float,
        delivery: Delivery | None = None,
        claim: Claim | None = None,
        withdraw: bool = False,
    ) -> bool:
        # Three files, so three commits, in the crash-safe order. The lease check and the writes
        # cannot interleave with another consumer's: the lock admits one.
        if claim is not None and not self.queue.holds(claim):
            return False
        if withdraw and not self.queue.withdraw(request_id):
            return False
        self.statuses.put(request_id, entry, ttl=ttl)
        if delivery is not None:
            self.outbox.owe(delivery)
        if claim is not None:
            self.queue.ack(claim)
        return True

    def keep_key(self, candidate: str) -> tuple[str, bool]:
        """In ``DATA_DIR/api_key``, readable by the service's user alone."""
        path = self.data_dir / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            kept = path.read_text(encoding="utf-8").strip()
            if kept:
                return kept, False
            path.unlink()  # left empty by a crash while it was written
            return self.keep_key(candidate)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(candidate + "\n")
        return candidate, True

    def describe_key_store(self) -> str:
        return str(self.data_dir / KEY_FILE)

    def consumer_admitted(self) -> bool:
        """Holds ``DATA_DIR/worker.lock`` for the process's life (its pid written in it)."""
        if self._lock is not None:
            return True
        handle = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        return True

    @property
    def previous_holders_gone(self) -> bool:
        # The lock admits one consumer at a time: whoever claimed before is dead.
        return self._lock is not None

    def lost_requests(self) -> list[str]:
        """Pending or processing statuses whose job the queue no longer holds: the queue database
        was deleted or moved aside (``selfcheck`` made someone accept that), or a crash came between
        a cancel taking a waiting job out and storing its status. Costs one indexed read of the
        status store plus a lookup per unfinished request (a few: those in flight)."""
        return [rid for rid in self.statuses.unfinished() if self.queue.find(rid) is None]

    def end_session(self, session: str, until: float) -> None:
        def write() -> None:
            # Sign-outs are rare: each one also drops the rows whose sessions expired.
            self._health.execute("DELETE FROM llm_proxy_signed_out WHERE until <= ?", (time.time(),))
            self._health.execute(
                "INSERT OR REPLACE INTO llm_proxy_signed_out VALUES (?, ?)", (session, until)
            )

        retrying("cannot record a sign-out", write, PATIENCE)

    def session_ended(self, session: str) -> bool:
        row = retrying(
            "cannot read sign-outs",
            lambda: self._health.execute(
                "SELECT 1 FROM llm_proxy_signed_out WHERE session = ? AND until > ?", (session, time.time())
            ).fetchone(),
            PATIENCE,
        )
        return row is not None

    def beat(self, holder: str) -> None:
        retrying(
            "cannot record the worker's heartbeat",
            lambda: self._health.execute(_MARK, ("worker", time.time())),
            PATIENCE,
        )

    def probe(self) -> float | None:
        self.queue.counts()
        self.statuses.get(PROBE_KEY)
        try:
            self._health.execute(_MARK, ("probe", time.time()))
        except sqlite3.Error as exc:
            # Another process holding the write lock (a burst of submits, a backup) is contention,
            # which a submit meets with 503 + Retry-After; a worker stopped inside a transaction
            # also stops beating, and is reported for that.
            if not (isinstance(exc, sqlite3.OperationalError) and _locked(exc)):
                raise StorageUnavailable(f"cannot write the job queue: {exc}") from exc
        row = retrying(
            "cannot read the heartbeat", lambda: self._health.execute(_LAST_BEAT).fetchone(), PATIENCE
        )
        # Web and worker share this machine's clock.
        return None if row is None else max(0.0, time.time() - float(row[0]))

    def close(self) -> None:
        for signals in self._signals:
            signals.close()
        self._health.close()
        self.outbox.close()
        self.queue.close()
        self.statuses.close()
        self.requests.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
