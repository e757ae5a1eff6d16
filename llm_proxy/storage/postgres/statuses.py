"""The networked status store: one row per request, expiring ``RESULT_TTL`` after it ended."""

from __future__ import annotations

import json
from collections.abc import Callable

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import Claim, StatusStore
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.postgres.database import Connection, Database

PURGE_LOCK = 7_210_003
_LIVE = "(expires_at IS NULL OR expires_at > now())"
_UPSERT = """
INSERT INTO llm_proxy_statuses (request_id, entry, expires_at)
VALUES (%s, %s, CASE WHEN %s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %s) END)
ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at
"""
# Statuses written under a lease, many in one statement (concurrent writers share it): each row
# only while its writer's lease is current.
_FENCED_UPSERT = """
INSERT INTO llm_proxy_statuses (request_id, entry, expires_at)
SELECT w.request_id, w.entry,
    CASE WHEN w.ttl IS NULL THEN NULL ELSE now() + make_interval(secs => w.ttl) END
FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bigint[], %s::bigint[])
    AS w(request_id, entry, ttl, ticket, token)
JOIN llm_proxy_jobs AS j ON j.ticket = w.ticket AND j.token = w.token AND j.state = 2
ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at
"""


class PostgresStatusStore(StatusStore):
    def __init__(self, database: Database) -> None:
        self._db = database
        # Concurrent reads share one query too.
        self._get = GroupCommit(self._get_many, "cannot read status")
        self._fenced = GroupCommit(self._put_fenced, "cannot store status")

    def put(
        self, request_id: str, entry: StatusEntry, ttl: float | None = None, *, claim: Claim | None = None
    ) -> None:
        if claim is None:
            with self._db.connection("cannot store status") as connection:
                self.put_in(connection, request_id, entry, ttl)
            return
        self._fenced((request_id, json.dumps(entry.to_dict()), ttl, claim))

    def _put_fenced(self, batch: list[tuple[str, str, float | None, Claim]]) -> list[None]:
        # Latest write wins when one request appears twice in a batch (one statement cannot
        # upsert a row twice).
        latest = {request_id: (entry, ttl, claim) for request_id, entry, ttl, claim in batch}
        self._db.execute(
            "cannot store status",
            _FENCED_UPSERT,
            (
                list(latest),
                [entry for entry, _, _ in latest.values()],
                [ttl for _, ttl, _ in latest.values()],
                [claim.ticket for _, _, claim in latest.values()],
                [claim.lease.token for _, _, claim in latest.values()],
            ),
        )
        return [None] * len(batch)

    @staticmethod
    def put_in(connection: Connection, request_id: str, entry: StatusEntry, ttl: float | None) -> None:
        connection.execute(_UPSERT, (request_id, json.dumps(entry.to_dict()), ttl, ttl))

    def get(self, request_id: str) -> StatusEntry | None:
        return self._get(request_id)

    def _get_many(self, request_ids: list[str]) -> list[StatusEntry | None]:
        rows = self._db.execute(
            "cannot read status",
            f"SELECT request_id, entry FROM llm_proxy_statuses WHERE request_id = ANY(%s) AND {_LIVE}",  # noqa: S608
            (list(set(request_ids)),),
        )
        found = {str(request_id): StatusEntry.from_dict(json.loads(entry)) for request_id, entry in rows}
        return [found.get(request_id) for request_id in request_ids]

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
