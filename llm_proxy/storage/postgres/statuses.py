"""The networked status store: one row per request, expiring ``RESULT_TTL`` after it ended."""

from __future__ import annotations

import json
from collections.abc import Callable

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import Claim, StatusStore
from llm_proxy.storage.postgres.database import Connection, Database

PURGE_LOCK = 7_210_003
_LIVE = "(expires_at IS NULL OR expires_at > now())"
_UPSERT = """
INSERT INTO llm_proxy_statuses (request_id, entry, expires_at)
VALUES (%s, %s, CASE WHEN %s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %s) END)
ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at
"""


class PostgresStatusStore(StatusStore):
    def __init__(self, database: Database) -> None:
        self._db = database

    def put(
        self, request_id: str, entry: StatusEntry, ttl: float | None = None, *, claim: Claim | None = None
    ) -> None:
        if claim is None:
            with self._db.connection("cannot store status") as connection:
                self.put_in(connection, request_id, entry, ttl)
            return
        # Written only while the writer's lease is current, in the same statement.
        self._db.execute(
            "cannot store status",
            "INSERT INTO llm_proxy_statuses (request_id, entry, expires_at)"
            " SELECT %s, %s,"
            " CASE WHEN %s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %s) END"
            " WHERE EXISTS"
            " (SELECT 1 FROM llm_proxy_jobs WHERE ticket = %s AND token = %s AND state = 2)"
            " ON CONFLICT (request_id) DO UPDATE"
            " SET entry = excluded.entry, expires_at = excluded.expires_at",
            (request_id, json.dumps(entry.to_dict()), ttl, ttl, claim.ticket, claim.lease.token),
        )

    @staticmethod
    def put_in(connection: Connection, request_id: str, entry: StatusEntry, ttl: float | None) -> None:
        connection.execute(_UPSERT, (request_id, json.dumps(entry.to_dict()), ttl, ttl))

    def get(self, request_id: str) -> StatusEntry | None:
        rows = self._db.execute(
            "cannot read status",
            f"SELECT entry FROM llm_proxy_statuses WHERE request_id = %s AND {_LIVE}",  # noqa: S608
            (request_id,),
        )
        return StatusEntry.from_dict(json.loads(rows[0][0])) if rows else None

    def update(
        self, request_id: str, change: Callable[[StatusEntry], StatusEntry | None]
    ) -> StatusEntry | None:
        with self._db.transaction("cannot update status") as connection:
            row = connection.execute(
                f"SELECT entry FROM llm_proxy_statuses WHERE request_id = %s AND {_LIVE} FOR UPDATE",  # noqa: S608
                (request_id,),
            ).fetchone()
            if row is None:
                return None
            current = StatusEntry.from_dict(json.loads(row[0]))
            changed = change(current)
            if changed is None:
                return current
            # The expiry stays as it was.
            connection.execute(
                "UPDATE llm_proxy_statuses SET entry = %s WHERE request_id = %s",
                (json.dumps(changed.to_dict()), request_id),
            )
            return changed

    def purge_expired(self) -> int:
        with self._db.alone("cannot purge statuses", PURGE_LOCK) as connection:
            if connection is None:
                return 0
            return int(
                connection.execute("DELETE FROM llm_proxy_statuses WHERE expires_at <= now()").rowcount
            )

    def close(self) -> None:
        """The database is closed by the back end that opened it."""
