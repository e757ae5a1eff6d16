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
- SQLite's busy wait freezes the gevent loop: timeouts are short and failures become
  ``StorageUnavailable``, which the web answers with 503 + Retry-After.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import diskcache
import persistqueue
import persistqueue.serializers.json as json_serializer
from gevent import monkey
from persistqueue.exceptions import Empty

from storage import Claim, Job, JobQueue, StatusStore, StorageUnavailable

QUEUE_NAME = "jobs"
_TABLE = f"ack_queue_{QUEUE_NAME}"
# persist-queue's AckStatus values: 0 inited, 1 ready (both "waiting"), 2 unack (in flight), 5 acked.
_IN_FLIGHT = 2
_ACKED = 5


class PersistJobQueue(JobQueue):
    def __init__(self, directory: Path, *, timeout: float = 2.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        try:
            self._queue = persistqueue.SQLiteAckQueue(
                str(directory),
                name=QUEUE_NAME,
                auto_resume=False,
                timeout=timeout,
                serializer=json_serializer,
            )
            self._reader = sqlite3.connect(str(directory / "data.db"), timeout=timeout)
            # Counting waiting rows and finding a row's place stay index lookups under a deep backlog.
            self._reader.execute(f"CREATE INDEX IF NOT EXISTS {_TABLE}_status_id ON {_TABLE} (status, _id)")
            self._reader.commit()
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the job queue in {directory}: {exc}") from exc

    def put(self, job: Job) -> int:
        try:
            ticket = self._queue.put(job.to_dict())
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot store the job: {exc}") from exc
        if ticket is None:  # pragma: no cover - persist-queue returns lastrowid for SQLite
            raise StorageUnavailable("the queue did not return a row id")
        return int(ticket)

    def claim(self) -> Claim | None:
        try:
            raw = self._queue.get(block=False, raw=True)
        except Empty:
            return None
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot claim a job: {exc}") from exc
        # The ack cache inside persist-queue would keep every claimed item alive forever otherwise.
        self._queue._unack_cache.pop(raw["pqid"], None)
        return Claim(ticket=int(raw["pqid"]), job=Job.from_dict(raw["data"]))

    def ack(self, ticket: int) -> None:
        self._mark(ticket, "ack")

    def release(self, ticket: int) -> None:
        self._mark(ticket, "nack")

    def _mark(self, ticket: int, how: str) -> None:
        try:
            getattr(self._queue, how)(id=ticket)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot {how} job {ticket}: {exc}") from exc

    def recover(self) -> int:
        count = self.in_flight()
        try:
            self._queue.resume_unack_tasks()
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot recover in-flight jobs: {exc}") from exc
        return count

    def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        try:
            row = self._reader.execute(sql, args).fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot read the job queue: {exc}") from exc
        return row[0] if row else None

    def waiting(self) -> int:
        return int(self._scalar(f"SELECT COUNT(*) FROM {_TABLE} WHERE status < ?", (_IN_FLIGHT,)))

    def in_flight(self) -> int:
        return int(self._scalar(f"SELECT COUNT(*) FROM {_TABLE} WHERE status = ?", (_IN_FLIGHT,)))

    def position(self, ticket: int) -> int | None:
        status = self._scalar(f"SELECT status FROM {_TABLE} WHERE _id = ?", (ticket,))
        if status is None or int(status) >= _IN_FLIGHT:
            return None
        return int(
            self._scalar(
                f"SELECT COUNT(*) FROM {_TABLE} WHERE status < ? AND _id <= ?",
                (_IN_FLIGHT, ticket),
            )
        )

    def compact(self) -> int:
        try:
            with self._reader:
                cursor = self._reader.execute(f"DELETE FROM {_TABLE} WHERE status = ?", (_ACKED,))
            return cursor.rowcount
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot compact the job queue: {exc}") from exc

    def close(self) -> None:
        self._reader.close()
        self._queue.close()


class DiskcacheStatusStore(StatusStore):
    def __init__(self, directory: Path, *, timeout: float = 2.0) -> None:
        try:
            self._cache = diskcache.Cache(
                str(directory),
                timeout=timeout,
                eviction_policy="none",
                statistics=False,
                tag_index=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the status store in {directory}: {exc}") from exc
        # One connection per process, not per greenlet (diskcache 5.6.3 keeps it in `_local`).
        self._cache.close()
        self._cache._local = monkey.get_original("_thread", "_local")()

    def create(self, request_id: str, entry: dict[str, Any]) -> bool:
        try:
            return bool(self._cache.add(request_id, entry, retry=False))
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise StorageUnavailable(f"cannot store status: {exc}") from exc

    def put(self, request_id: str, entry: dict[str, Any], ttl: float | None = None) -> None:
        try:
            self._cache.set(request_id, entry, expire=ttl, retry=False)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise StorageUnavailable(f"cannot store status: {exc}") from exc

    def get(self, request_id: str) -> dict[str, Any] | None:
        try:
            value = self._cache.get(request_id, default=None, retry=False)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise StorageUnavailable(f"cannot read status: {exc}") from exc
        return value if isinstance(value, dict) else None

    def purge_expired(self) -> int:
        try:
            return int(self._cache.expire(retry=False))
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise StorageUnavailable(f"cannot purge statuses: {exc}") from exc

    def close(self) -> None:
        self._cache.close()


def open_outbox(data_dir: Path, *, timeout: float = 2.0) -> PersistJobQueue:
    """The queue of owed webhook deliveries (consumed, like the job queue, by the worker only)."""
    return PersistJobQueue(data_dir / "outbox", timeout=timeout)


def open_storage(data_dir: Path, *, timeout: float = 2.0) -> tuple[PersistJobQueue, DiskcacheStatusStore]:
    """The queue and the status store of one DATA_DIR (created if missing)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageUnavailable(f"cannot create DATA_DIR {data_dir}: {exc}") from exc
    return (
        PersistJobQueue(data_dir / "queue", timeout=timeout),
        DiskcacheStatusStore(data_dir / "status", timeout=timeout),
    )
