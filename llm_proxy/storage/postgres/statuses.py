"""The networked status store: one row per request, expiring ``RESULT_TTL`` after it ended."""

from __future__ import annotations

import json
from collections.abc import Callable

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import Claim, StatusStore
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.postgres.database import Connection, Database
from llm_proxy.storage.postgres.requests import COLUMNS as LISTED
from llm_proxy.storage.postgres.requests import ON_CONFLICT as LISTED_CHANGED
from llm_proxy.storage.postgres.requests import listing_json
from llm_proxy.storage.postgres.requests import values as listed_values

PURGE_LOCK = 7_210_003
_LIVE = "(expires_at IS NULL OR expires_at > now())"
# Each writes the listed columns too (``requests``), from the entry's listing JSON.
_UPSERT = f"""
INSERT INTO llm_proxy_statuses (request_id, entry, expires_at, {LISTED})
SELECT %(request_id)s, %(entry)s,
    CASE WHEN %(ttl)s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %(ttl)s) END,
    {listed_values("l", "(SELECT submitted_at FROM llm_proxy_jobs WHERE request_id = %(request_id)s)")}
FROM json_populate_record(NULL::llm_proxy_listing, %(listing)s::json) AS l
ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at,
    {LISTED_CHANGED}
"""  # noqa: S608
# Statuses written under a lease, many in one statement (concurrent writers share it): each row
# only while its writer's lease is current.
_FENCED_UPSERT = f"""
INSERT INTO llm_proxy_statuses (request_id, entry, expires_at, {LISTED})
SELECT w.request_id, w.entry,
    CASE WHEN w.ttl IS NULL THEN NULL ELSE now() + make_interval(secs => w.ttl) END,
    {listed_values("l", "j.submitted_at")}
FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bigint[], %s::bigint[], %s::text[])
    AS w(request_id, entry, ttl, ticket, token, listing)
JOIN llm_proxy_jobs AS j ON j.ticket = w.ticket AND j.token = w.token AND j.state = 2
CROSS JOIN LATERAL json_populate_record(NULL::llm_proxy_listing, w.listing::json) AS l
ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at,
    {LISTED_CHANGED}
"""  # noqa: S608

# ``update`` keeps the submit time the row has.
_UPDATE = f"""
UPDATE llm_proxy_statuses SET entry = %s, ({LISTED}) = (
    SELECT {listed_values("l", "llm_proxy_statuses.submitted_at")}
    FROM json_populate_record(NULL::llm_proxy_listing, %s::json) AS l
) WHERE request_id = %s
"""  # noqa: S608


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
        self._fenced((request_id, json.dumps(entry.to_dict()), ttl, claim, listing_json(entry)))

    def _put_fenced(self, batch: list[tuple[str, str, float | None, Claim, str]]) -> list[None]:
        # Latest write wins when one request appears twice in a batch (one statement cannot
        # upsert a row twice).
        latest = {request_id: (entry, ttl, claim) for request_id, entry, ttl, claim, _ in batch}
        listings = {request_id: listing for request_id, _, _, _, listing in batch}
        self._db.execute(
            "cannot store status",
            _FENCED_UPSERT,
            (
                list(latest),
                [entry for entry, _, _ in latest.values()],
                [ttl for _, ttl, _ in latest.values()],
                [claim.ticket for _, _, claim in latest.values()],
                [claim.lease.token for _, _, claim in latest.values()],
                [listings[request_id] for request_id in latest],
            ),
        )
        return [None] * len(batch)

    @staticmethod
    def put_in(connection: Connection, request_id: str, entry: StatusEntry, ttl: float | None) -> None:
        connection.execute(
            _UPSERT,
            {
                "request_id": request_id,
                "entry": json.dumps(entry.to_dict()),
                "ttl": ttl,
                "listing": listing_json(entry),
            },
        )

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
                _UPDATE,
                (json.dumps(changed.to_dict()), listing_json(changed), request_id),
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
