"""The one-machine back end: persist-queue (SQLite) for jobs, diskcache for statuses.

Pitfalls handled here (see shared notes, measured on this stack):
- persist-queue's ``get(block=True)`` re-reads only every 10 s across processes: we only ever claim
  without blocking; the worker is woken by ``wakeup``.
- its counters are per process: counts come from SQL on our own read connection.
- ``ack`` by object identity silently does nothing for a copy: we ack by row id.
- ``resume_unack_tasks`` resets rows a live worker holds: producers open with ``auto_resume=False``
  and only the single (file-locked) consumer calls ``recover`` at its start.
- diskcache keeps one SQLite connection per ``threading.local``, which gevent turns into one per
  greenlet: the cache gets the unpatched thread-local, so one connection serves the process.
- diskcache's default 1 GiB limit evicts live entries: eviction is off; expiry alone removes entries.
- SQLite's busy wait freezes the gevent loop: it is kept at 50 ms, and a locked database is retried
  with ``gevent.sleep`` (other greenlets keep running) for up to ``patience`` seconds; then the
  failure becomes ``StorageUnavailable``, which the web answers with 503 + Retry-After.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import diskcache
import gevent
import gevent.event
import persistqueue
import persistqueue.serializers.json as json_serializer
from gevent import monkey

from storage import (
    IDEMPOTENCY_WINDOW,
    Claim,
    IdempotencyConflict,
    Job,
    JobQueue,
    Queued,
    StatusStore,
    StorageUnavailable,
    body_digest,
)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")

OPEN_TIMEOUT = 10.0
"""SQLite busy wait while opening: web and worker may create the same tables at once."""
BUSY_WAIT = 0.05
"""SQLite's own busy wait afterwards, which blocks every greenlet of the process while it lasts."""
PATIENCE = 2.0
"""How long a locked database is retried (cooperatively) before the operation fails."""

QUEUE_NAME = "jobs"
_TABLE = f"ack_queue_{QUEUE_NAME}"
# persist-queue's AckStatus values: 0 inited, 1 ready (both "waiting"), 2 unack (in flight), 5 acked.
_IN_FLIGHT = 2
_ACKED = 5


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, diskcache.Timeout) or "locked" in str(exc) or "busy" in str(exc)


def _retrying(what: str, action: Callable[[], T], patience: float) -> T:
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
def _immediate(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on an autocommit connection: committed, or rolled back on any error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _bucket(row: str) -> str:
    return (
        f"CASE WHEN {row}.status < {_IN_FLIGHT} THEN 'waiting'"
        f" WHEN {row}.status = {_IN_FLIGHT} THEN 'in_flight' ELSE '' END"
    )


# Exact waiting / in-flight counts for every process, kept by triggers in the same transaction as
# the change: a COUNT(*) per submit would cost O(backlog), and persist-queue's own counters are
# per process. The (status, _id) index serves positions, claims and the oldest waiting row.
_COUNTING_SCHEMA = f"""
CREATE INDEX IF NOT EXISTS {_TABLE}_status_id ON {_TABLE} (status, _id);
CREATE TABLE IF NOT EXISTS {_TABLE}_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO {_TABLE}_counts VALUES
    ('waiting', (SELECT COUNT(*) FROM {_TABLE} WHERE status < {_IN_FLIGHT})),
    ('in_flight', (SELECT COUNT(*) FROM {_TABLE} WHERE status = {_IN_FLIGHT}));
CREATE TRIGGER IF NOT EXISTS {_TABLE}_count_insert AFTER INSERT ON {_TABLE} BEGIN
    UPDATE {_TABLE}_counts SET n = n + 1 WHERE name = {_bucket("NEW")};
END;
CREATE TRIGGER IF NOT EXISTS {_TABLE}_count_update AFTER UPDATE OF status ON {_TABLE}
WHEN {_bucket("OLD")} != {_bucket("NEW")} BEGIN
    UPDATE {_TABLE}_counts SET n = n - 1 WHERE name = {_bucket("OLD")};
    UPDATE {_TABLE}_counts SET n = n + 1 WHERE name = {_bucket("NEW")};
END;
CREATE TRIGGER IF NOT EXISTS {_TABLE}_count_delete AFTER DELETE ON {_TABLE} BEGIN
    UPDATE {_TABLE}_counts SET n = n - 1 WHERE name = {_bucket("OLD")};
END;
CREATE TABLE IF NOT EXISTS {_TABLE}_ids (request_id TEXT PRIMARY KEY, ticket INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {_TABLE}_cancels (request_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {_TABLE}_idempotency (
    owner TEXT NOT NULL, key TEXT NOT NULL, request_id TEXT NOT NULL, body_hash TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (owner, key)) WITHOUT ROWID;
"""
_FIND_KEY = (
    f"SELECT request_id, body_hash FROM {_TABLE}_idempotency WHERE owner = ? AND key = ? AND created_at > ?"
)
_RECORD_KEY = f"INSERT OR REPLACE INTO {_TABLE}_idempotency VALUES (?, ?, ?, ?, ?)"
# A job found by request id, with its place in line when it waits, counted from whichever end of
# the line is nearer (O(distance), not O(backlog)); CASE runs only the count it picks. The body
# comes out as JSON text, never decoded.
_FIND = f"""
WITH r AS (
    SELECT t._id AS ticket, t.status AS status, t.data AS data
    FROM {_TABLE}_ids AS i JOIN {_TABLE} AS t ON t._id = i.ticket
    WHERE i.request_id = :request_id AND t.status < {_ACKED}),
e AS (SELECT
    (SELECT MIN(m) FROM (SELECT MIN(_id) AS m FROM {_TABLE} WHERE status = 0
                         UNION ALL SELECT MIN(_id) FROM {_TABLE} WHERE status = 1)) AS oldest,
    (SELECT MAX(_id) FROM {_TABLE}) AS newest)
SELECT r.ticket, r.status, json_extract(r.data, '$.owner'), json_extract(r.data, '$.submitted_at'),
    json_extract(r.data, '$.body'),
    CASE
        WHEN r.status >= {_IN_FLIGHT} THEN NULL
        WHEN r.ticket - e.oldest <= e.newest - r.ticket
            THEN (SELECT COUNT(*) FROM {_TABLE} WHERE status IN (0, 1) AND _id <= r.ticket)
        ELSE (SELECT n FROM {_TABLE}_counts WHERE name = 'waiting')
            - (SELECT COUNT(*) FROM {_TABLE} WHERE status IN (0, 1) AND _id > r.ticket)
    END
FROM r, e
"""

# Rows in persist-queue's own format (json serializer, status 0 = inited), so its get/ack/nack
# and resume work on them unchanged.
_INSERT_JOB = f"INSERT INTO {_TABLE} (data, timestamp, status) VALUES (?, ?, 0)"
_INSERT_ID = f"INSERT OR REPLACE INTO {_TABLE}_ids (request_id, ticket) VALUES (?, ?)"
# The oldest waiting jobs: start at the oldest waiting id (index) and walk the rowid order from
# there, so acked rows not yet compacted away are never scanned (persist-queue's own get starts at
# id 0 and slows down as they pile up).
_CLAIM = f"""
SELECT _id, data, status,
    EXISTS (SELECT 1 FROM {_TABLE}_cancels WHERE request_id = json_extract(data, '$.request_id'))
FROM {_TABLE} NOT INDEXED
WHERE status < {_IN_FLIGHT} AND _id >= (
    SELECT MIN(m) FROM (SELECT MIN(_id) AS m FROM {_TABLE} WHERE status = 0
                        UNION ALL SELECT MIN(_id) FROM {_TABLE} WHERE status = 1))
ORDER BY _id LIMIT ?
"""
_MARK_CLAIMED = f"UPDATE {_TABLE} SET status = {_IN_FLIGHT} WHERE _id = ?"
_ACK = f"UPDATE {_TABLE} SET status = {_ACKED} WHERE _id = ?"


class _GroupCommit(Generic[I, R]):
    """Calls from concurrent greenlets share one transaction, so one fsync covers a whole batch.

    The first caller leads: it yields once, letting greenlets that are ready add their items, then
    runs ``write`` on the batch and hands every caller its result. A call still returns only once
    its item is committed (synchronous=FULL).
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
            values = _retrying(self._what, lambda: self._write(items), self._patience)
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


class PersistJobQueue(JobQueue):
    def __init__(self, directory: Path, *, patience: float = PATIENCE) -> None:
        self._patience = patience
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._queue = persistqueue.SQLiteAckQueue(
                str(directory),
                name=QUEUE_NAME,
                auto_resume=False,
                timeout=OPEN_TIMEOUT,
                serializer=json_serializer,
            )
            self._reader = sqlite3.connect(
                str(directory / "data.db"), timeout=OPEN_TIMEOUT, isolation_level=None
            )
            try:
                # One transaction: web and worker may both set this up at the same moment.
                self._reader.executescript(f"BEGIN IMMEDIATE; {_COUNTING_SCHEMA} COMMIT;")
            finally:
                if self._reader.in_transaction:
                    self._reader.execute("ROLLBACK")
            self._writer = sqlite3.connect(str(directory / "data.db"), isolation_level=None)
            # Claims and acks need no fsync: after any restart every claimed job waits again
            # (recover), and a lost ack only hands out a job whose final status is already stored.
            self._claimer = sqlite3.connect(str(directory / "data.db"), isolation_level=None)
            for connection in (self._queue._conn, self._reader, self._writer, self._claimer):
                connection.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT * 1000)}")
            self._writer.execute("PRAGMA synchronous = FULL")
            self._claimer.execute("PRAGMA synchronous = NORMAL")
            self._put = _GroupCommit(self._insert, "cannot store the job", patience)
            self._ack = _GroupCommit(self._mark_acked, "cannot ack a job", patience)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the job queue in {directory}: {exc}") from exc

    def put(self, job: Job) -> int:
        # Without a key the result is always the new job's ticket.
        return int(self._put((json_serializer.dumps(job.to_dict()), job, None)))  # type: ignore[arg-type]

    def put_once(self, job: Job, key: str) -> str:
        result = self._put((json_serializer.dumps(job.to_dict()), job, key))
        if isinstance(result, IdempotencyConflict):
            raise result
        return job.request_id if isinstance(result, int) else result

    def _insert(self, items: list[tuple[bytes, Job, str | None]]) -> list[int | str | IdempotencyConflict]:
        """Each item's ticket; for a key already used within the window, the earlier request id
        (same body) or a conflict (another body). Keys are checked and recorded in the same
        transaction as the jobs, so two racing submits with one key queue once."""
        results: list[int | str | IdempotencyConflict] = []
        now = time.time()
        with _immediate(self._writer) as connection:
            for data, job, key in items:
                digest = body_digest(job.body) if key is not None else ""
                if key is not None:
                    earlier = connection.execute(
                        _FIND_KEY, (job.owner, key, now - IDEMPOTENCY_WINDOW)
                    ).fetchone()
                    if earlier is not None:
                        same = earlier[1] == digest
                        results.append(str(earlier[0]) if same else IdempotencyConflict(str(earlier[0])))
                        continue
                ticket = int(connection.execute(_INSERT_JOB, (data, now)).lastrowid or 0)
                connection.execute(_INSERT_ID, (job.request_id, ticket))
                if key is not None:
                    connection.execute(_RECORD_KEY, (job.owner, key, job.request_id, digest, now))
                results.append(ticket)
        return results

    def _mark_acked(self, tickets: list[int]) -> list[None]:
        with _immediate(self._claimer) as connection:
            connection.executemany(_ACK, [(t,) for t in tickets])
        return [None] * len(tickets)

    def find(self, request_id: str) -> Queued | None:
        row = _retrying(
            "cannot read the job queue",
            lambda: self._reader.execute(_FIND, {"request_id": request_id}).fetchone(),
            self._patience,
        )
        if row is None:
            return None
        ticket, status, owner, submitted_at, body_json, position = row
        return Queued(
            ticket=int(ticket),
            request_id=request_id,
            owner=str(owner),
            submitted_at=int(submitted_at or 0),
            body_json=str(body_json),
            in_flight=int(status) >= _IN_FLIGHT,
            fresh=int(status) == 0,
            position=None if position is None else int(position),
        )

    def claim_many(self, limit: int) -> list[Claim]:
        def take() -> list[Any]:
            with _immediate(self._claimer) as connection:
                rows = connection.execute(_CLAIM, (limit,)).fetchall()
                connection.executemany(_MARK_CLAIMED, [(row[0],) for row in rows])
            return list(rows)

        rows = _retrying("cannot claim jobs", take, self._patience)
        return [
            Claim(
                ticket=int(t),
                job=Job.from_dict(json_serializer.loads(data)),
                fresh=int(status) == 0,
                cancel_requested=bool(cancelled),
            )
            for t, data, status, cancelled in rows
        ]

    def cancel(self, request_id: str) -> str | None:
        def mark() -> str | None:
            with _immediate(self._writer) as connection:
                row = connection.execute(
                    f"SELECT t._id, t.status FROM {_TABLE}_ids AS i JOIN {_TABLE} AS t ON t._id = i.ticket"
                    " WHERE i.request_id = ?",
                    (request_id,),
                ).fetchone()
                if row is None or int(row[1]) >= _ACKED:
                    return None
                if int(row[1]) < _IN_FLIGHT:
                    connection.execute(_ACK, (row[0],))
                    return "cancelled"
                connection.execute(f"INSERT OR IGNORE INTO {_TABLE}_cancels VALUES (?)", (request_id,))
                return "in_flight"

        return _retrying("cannot cancel the job", mark, self._patience)

    def cancel_requested(self, request_id: str) -> bool:
        return self._scalar(f"SELECT 1 FROM {_TABLE}_cancels WHERE request_id = ?", (request_id,)) is not None

    def ack(self, ticket: int) -> None:
        self._ack(ticket)

    def release(self, ticket: int) -> None:
        self._mark(ticket, "nack")

    def _mark(self, ticket: int, how: str) -> None:
        mark = getattr(self._queue, how)
        _retrying(f"cannot {how} job {ticket}", lambda: mark(id=ticket), self._patience)

    def recover(self) -> int:
        count = self.in_flight()
        _retrying("cannot recover in-flight jobs", self._queue.resume_unack_tasks, self._patience)
        return count

    def _scalar(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        row = _retrying(
            "cannot read the job queue", lambda: self._reader.execute(sql, args).fetchone(), self._patience
        )
        return row[0] if row else None

    def counts(self) -> tuple[int, int]:
        rows = _retrying(
            "cannot read the job queue",
            lambda: self._reader.execute(f"SELECT name, n FROM {_TABLE}_counts").fetchall(),
            self._patience,
        )
        found = dict(rows)
        return int(found["waiting"]), int(found["in_flight"])

    def compact(self) -> int:
        def delete() -> int:
            with _immediate(self._reader) as connection:
                connection.execute(
                    f"DELETE FROM {_TABLE}_cancels WHERE request_id IN (SELECT i.request_id FROM {_TABLE}_ids"
                    f" AS i JOIN {_TABLE} AS t ON t._id = i.ticket WHERE t.status = ?)",
                    (_ACKED,),
                )
                connection.execute(
                    f"DELETE FROM {_TABLE}_ids WHERE ticket IN (SELECT _id FROM {_TABLE} WHERE status = ?)",
                    (_ACKED,),
                )
                connection.execute(
                    f"DELETE FROM {_TABLE}_idempotency WHERE created_at < ?",
                    (time.time() - IDEMPOTENCY_WINDOW,),
                )
                return int(connection.execute(f"DELETE FROM {_TABLE} WHERE status = ?", (_ACKED,)).rowcount)

        return _retrying("cannot compact the job queue", delete, self._patience)

    def close(self) -> None:
        self._writer.close()
        self._claimer.close()
        self._reader.close()
        self._queue.close()


class DiskcacheStatusStore(StatusStore):
    def __init__(self, directory: Path, *, patience: float = PATIENCE) -> None:
        self._patience = patience
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
        # One connection per process, not per greenlet (diskcache 5.6.3 keeps it in `_local`).
        self._cache.close()
        self._cache._local = monkey.get_original("_thread", "_local")()
        self._cache._timeout = BUSY_WAIT
        # Status writes from concurrent greenlets share one transaction.
        self._put = _GroupCommit(self._set_all, "cannot store status", patience)

    def put(self, request_id: str, entry: dict[str, Any], ttl: float | None = None) -> None:
        self._put((request_id, entry, ttl))

    def _set_all(self, items: list[tuple[str, dict[str, Any], float | None]]) -> list[None]:
        # Nothing in here yields to another greenlet (see the notes on cache.transact()).
        with self._cache.transact(retry=False):
            for request_id, entry, ttl in items:
                self._cache.set(request_id, entry, expire=ttl, retry=False)
        return [None] * len(items)

    def get(self, request_id: str) -> dict[str, Any] | None:
        value = _retrying("cannot read status", lambda: self._cache.get(request_id), self._patience)
        return value if isinstance(value, dict) else None

    def purge_expired(self) -> int:
        return int(_retrying("cannot purge statuses", self._cache.expire, self._patience))

    def close(self) -> None:
        self._cache.close()


def open_outbox(data_dir: Path) -> PersistJobQueue:
    """The queue of owed webhook deliveries (consumed, like the job queue, by the worker only)."""
    return PersistJobQueue(data_dir / "outbox")


def open_storage(data_dir: Path) -> tuple[PersistJobQueue, DiskcacheStatusStore]:
    """The queue and the status store of one DATA_DIR (created if missing)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageUnavailable(f"cannot create DATA_DIR {data_dir}: {exc}") from exc
    return (
        PersistJobQueue(data_dir / "queue"),
        DiskcacheStatusStore(data_dir / "status"),
    )
