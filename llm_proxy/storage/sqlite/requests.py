"""The embedded index of requests per owner: a table in the queue's database.

- A job's row is inserted by the queue in the transaction that stores the job (``submitted``), so a
  request is listed from the moment it is accepted, at no extra commit.
- Each status write updates it (``record``) right after the status store's own commit. The two are
  separate files, so a crash in between leaves the row one step behind until the request's next
  write; a row never goes back to an older state (``changed_at``), so concurrent writers cannot
  reorder it.
- Rows of final requests carry the result's expiry: expired ones are never listed and are deleted
  with the status store's purge.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llm_proxy.domain.job import Job
from llm_proxy.domain.listing import (
    RECENT_LATENCIES,
    Listed,
    Summary,
    id_condition,
    listed_endpoint,
    model_of,
)
from llm_proxy.domain.status import Status, StatusEntry, WebhookState
from llm_proxy.storage.base import RequestIndex, StorageUnavailable
from llm_proxy.storage.sqlite.transactions import BUSY_WAIT, OPEN_TIMEOUT, PATIENCE, immediate, retrying

log = logging.getLogger("llm_proxy.storage")

TABLE = "llm_proxy_requests"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, submitted_at INTEGER NOT NULL,
    status TEXT NOT NULL, endpoint TEXT NOT NULL, model TEXT, attempts INTEGER NOT NULL,
    error_type TEXT, finished_at INTEGER, upstream_ms INTEGER, webhook TEXT,
    changed_at INTEGER NOT NULL, expires_at REAL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {TABLE}_newest ON {TABLE} (owner, submitted_at, request_id);
CREATE INDEX IF NOT EXISTS {TABLE}_by_status ON {TABLE} (owner, status, submitted_at, request_id);
CREATE INDEX IF NOT EXISTS {TABLE}_finished ON {TABLE} (owner, finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS {TABLE}_webhooks ON {TABLE} (owner, webhook)
    WHERE webhook IN ('pending', 'failed');
CREATE INDEX IF NOT EXISTS {TABLE}_expiry ON {TABLE} (expires_at) WHERE expires_at IS NOT NULL;
"""
COLUMNS = (
    "request_id, owner, submitted_at, status, endpoint, model, attempts, error_type, finished_at,"
    " upstream_ms, webhook, changed_at, expires_at"
)
_INSERT_PENDING = (
    f"INSERT OR IGNORE INTO {TABLE} ({COLUMNS})"
    " VALUES (?, ?, ?, 'pending', ?, ?, 0, NULL, NULL, NULL, NULL, ?, NULL)"
)
# The submit time stays as the queue recorded it (a cancel's entry may not carry it).
_RECORD = f"""
INSERT INTO {TABLE} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO UPDATE SET
    status = excluded.status, model = coalesce(excluded.model, model), attempts = excluded.attempts,
    error_type = excluded.error_type, finished_at = excluded.finished_at,
    upstream_ms = coalesce(excluded.upstream_ms, upstream_ms), webhook = excluded.webhook,
    changed_at = excluded.changed_at, expires_at = excluded.expires_at
WHERE excluded.changed_at >= {TABLE}.changed_at
"""
_LIVE = "(expires_at IS NULL OR expires_at > :now)"


def _row(listed: Listed, expires_at: float | None) -> tuple[Any, ...]:
    return (
        listed.request_id,
        listed.owner,
        listed.submitted_at,
        listed.status.value,
        listed.endpoint,
        listed.model,
        listed.attempts,
        listed.error_type,
        listed.finished_at,
        listed.upstream_ms,
        listed.webhook,
        listed.changed_at,
        expires_at,
    )


def _listed(row: tuple[Any, ...]) -> Listed:
    return Listed(
        request_id=row[0],
        owner=row[1],
        submitted_at=int(row[2]),
        status=Status(row[3]),
        # From the id: rows written before it was recorded say chat for every endpoint.
        endpoint=listed_endpoint(row[0]),
        model=row[5],
        attempts=int(row[6]),
        error_type=row[7],
        finished_at=None if row[8] is None else int(row[8]),
        upstream_ms=None if row[9] is None else int(row[9]),
        webhook=row[10],
        changed_at=int(row[11]),
    )


def create(connection: sqlite3.Connection) -> None:
    """Create the table (idempotent) inside the caller's transaction."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            connection.execute(statement)


def submitted(connection: sqlite3.Connection, job: Job) -> None:
    """The job's row, in the queue's transaction that stores the job."""
    connection.execute(
        _INSERT_PENDING,
        (
            job.request_id,
            job.owner,
            job.submitted_at,
            listed_endpoint(job.request_id),
            model_of(job.body_json),
            job.submitted_at,
        ),
    )


class SqliteRequestIndex(RequestIndex):
    def __init__(self, database: Path, *, patience: float = PATIENCE) -> None:
        self._patience = patience
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(database), timeout=OPEN_TIMEOUT, isolation_level=None)
            with immediate(self._db) as connection:
                create(connection)
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT * 1000)}")
            # Derived data: a write lost in a power cut is redone by the request's next status.
            self._db.execute("PRAGMA synchronous = NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the request index in {database}: {exc}") from exc

    def record(self, written: Iterable[tuple[str, StatusEntry, float | None]]) -> None:
        """Update the rows of statuses just stored (request id, entry, seconds to live). A failure
        is logged, not raised: the status itself is stored, and the row catches up at the
        request's next write."""
        now = time.time()
        rows = [
            _row(Listed.of(request_id, entry), None if ttl is None else now + ttl)
            for request_id, entry, ttl in written
        ]

        def write() -> None:
            with immediate(self._db) as connection:
                connection.executemany(_RECORD, rows)

        try:
            retrying("cannot update the request index", write, self._patience)
        except StorageUnavailable as exc:
            log.warning("%s (the dashboard lists these requests as they were)", exc)

    def list_for(
        self,
        owner: str,
        *,
        status: Status | None = None,
        endpoint: str | None = None,
        before: tuple[int, str] | None = None,
        limit: int = 50,
    ) -> list[Listed]:
        where = ["owner = :owner", _LIVE]
        args: dict[str, Any] = {"owner": owner, "now": time.time(), "limit": limit}
        if status is not None:
            where.append("status = :status")
            args["status"] = status.value
        if endpoint is not None:
            where.append(id_condition(endpoint))
        if before is not None:
            where.append("(submitted_at, request_id) < (:at, :id)")
            args["at"], args["id"] = before
        sql = (
            f"SELECT {COLUMNS} FROM {TABLE} WHERE {' AND '.join(where)}"
            " ORDER BY submitted_at DESC, request_id DESC LIMIT :limit"
        )
        rows = retrying(
            "cannot read the request index", lambda: self._db.execute(sql, args).fetchall(), self._patience
        )
        return [_listed(row) for row in rows]

    def summary(self, owner: str, *, since: int) -> Summary:
        args = {"owner": owner, "since": since, "now": time.time()}

        def read() -> Summary:
            per_minute = {
                int(minute): (int(done), int(failed))
                for minute, done, failed in self._db.execute(
                    f"SELECT finished_at / 60000 * 60000 AS minute, sum(status = 'completed'),"
                    f" sum(status = 'error') FROM {TABLE}"
                    " WHERE owner = :owner AND finished_at >= :since GROUP BY minute",
                    args,
                )
            }
            latencies = [
                int(ms)
                for (ms,) in self._db.execute(
                    f"SELECT upstream_ms FROM {TABLE} WHERE owner = :owner AND finished_at >= :since"
                    f" AND upstream_ms IS NOT NULL ORDER BY finished_at DESC LIMIT {RECENT_LATENCIES}",
                    args,
                )
            ]
            webhooks = dict(
                self._db.execute(
                    f"SELECT webhook, count(*) FROM {TABLE} WHERE owner = :owner"
                    f" AND webhook IN ('pending', 'failed') AND {_LIVE} GROUP BY webhook",
                    args,
                ).fetchall()
            )
            return Summary(
                per_minute=per_minute,
                latencies_ms=latencies,
                webhooks_pending=int(webhooks.get(WebhookState.PENDING.value, 0)),
                webhooks_failed=int(webhooks.get(WebhookState.FAILED.value, 0)),
            )

        return retrying("cannot read the request index", read, self._patience)

    def purge_expired(self) -> int:
        def delete() -> int:
            with immediate(self._db) as connection:
                deleted = connection.execute(f"DELETE FROM {TABLE} WHERE expires_at <= ?", (time.time(),))
                return int(deleted.rowcount)

        return retrying("cannot purge the request index", delete, self._patience)

    def close(self) -> None:
        self._db.close()
