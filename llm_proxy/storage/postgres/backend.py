"""The networked back end: one PostgreSQL database for any number of web and worker processes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
from psycopg.rows import TupleRow

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
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.postgres.database import Database
from llm_proxy.storage.postgres.limit import SharedLimit
from llm_proxy.storage.postgres.outbox import PostgresOutbox
from llm_proxy.storage.postgres.queue import PostgresJobQueue
from llm_proxy.storage.postgres.requests import COLUMNS as LISTED
from llm_proxy.storage.postgres.requests import ON_CONFLICT as LISTED_CHANGED
from llm_proxy.storage.postgres.requests import PostgresRequestIndex, listing_json
from llm_proxy.storage.postgres.requests import values as listed_values
from llm_proxy.storage.postgres.schema import migrate
from llm_proxy.storage.postgres.signals import PostgresWebSignals, PostgresWorkerSignals
from llm_proxy.storage.postgres.statuses import PostgresStatusStore

# Finishing claimed jobs, many in one statement (concurrent finishes share it: one round trip
# and one commit for the batch). Each ack is fenced by its lease token; only the acked ones get
# their status and owed webhook.
_FINISH_MANY = f"""
WITH done AS (
    SELECT * FROM unnest(
        %(tickets)s::bigint[], %(tokens)s::bigint[], %(request_ids)s::text[], %(entries)s::text[],
        %(ttls)s::float8[], %(owes)s::boolean[], %(owners)s::text[], %(urls)s::text[],
        %(payloads)s::text[], %(listings)s::text[]
    ) AS d(ticket, token, request_id, entry, ttl, owes, owner, url, payload, listing)
), locked AS MATERIALIZED (
    -- In ticket order, as lease renewals lock them: two multi-row updates taking the same rows in
    -- different orders deadlock until deadlock_timeout (1 s) aborts one.
    SELECT ticket FROM llm_proxy_jobs WHERE ticket IN (SELECT ticket FROM done) ORDER BY ticket FOR UPDATE
), acked AS (
    UPDATE llm_proxy_jobs AS j SET state = 3, calling = false, finished_at = now()
    FROM done JOIN locked USING (ticket)
    WHERE j.ticket = done.ticket AND j.token = done.token AND j.state = 2
    RETURNING j.ticket, j.submitted_at
), status AS (
    INSERT INTO llm_proxy_statuses (request_id, entry, expires_at, {LISTED})
    SELECT done.request_id, done.entry, now() + make_interval(secs => done.ttl),
        {listed_values("l", "acked.submitted_at")}
    FROM done JOIN acked USING (ticket)
        CROSS JOIN LATERAL json_populate_record(NULL::llm_proxy_listing, done.listing::json) AS l
    ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at,
        {LISTED_CHANGED}
), owed AS (
    INSERT INTO llm_proxy_outbox (request_id, owner, url, payload)
    SELECT done.request_id, done.owner, done.url, done.payload
    FROM done JOIN acked USING (ticket) WHERE done.owes ORDER BY done.ticket
), freed AS (
    -- Their slots are free now: wake the workers waiting for one.
    SELECT pg_notify('llm_proxy_work', '') FROM (SELECT 1 FROM acked LIMIT 1) AS any_acked
)
SELECT acked.ticket FROM acked LEFT JOIN freed ON true
"""  # noqa: S608

# The web cancelling a waiting job: out of the queue, with its final status, at once.
_WITHDRAW = f"""
WITH acked AS (
    UPDATE llm_proxy_jobs SET state = 3, calling = false, finished_at = now()
    WHERE request_id = %(request_id)s AND state < 2
    RETURNING submitted_at
), status AS (
    INSERT INTO llm_proxy_statuses (request_id, entry, expires_at, {LISTED})
    SELECT %(request_id)s, %(entry)s, now() + make_interval(secs => %(ttl)s),
        {listed_values("l", "acked.submitted_at")}
    FROM acked CROSS JOIN json_populate_record(NULL::llm_proxy_listing, %(listing)s::json) AS l
    ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at,
        {LISTED_CHANGED}
), owed AS (
    INSERT INTO llm_proxy_outbox (request_id, owner, url, payload)
    SELECT %(request_id)s, %(owner)s, %(url)s, %(payload)s FROM acked WHERE %(owes)s
)
SELECT count(*) FROM acked
"""  # noqa: S608


# A worker's heartbeat; heartbeats of workers gone for an hour are dropped on the way, so the
# table stays as small as the number of live workers.
_BEAT = """
WITH gone AS (
    DELETE FROM llm_proxy_heartbeats WHERE beat_at < now() - interval '1 hour' AND holder <> %(holder)s
)
INSERT INTO llm_proxy_heartbeats VALUES (%(holder)s, now())
ON CONFLICT (holder) DO UPDATE SET beat_at = excluded.beat_at
"""

# /health's probe in one round trip: a write (one row, the same for every web process) and a read
# of the freshest heartbeat, by the server's clock.
_PROBE = """
WITH written AS (
    INSERT INTO llm_proxy_settings VALUES ('health_probe', now()::text)
    ON CONFLICT (name) DO UPDATE SET value = excluded.value
)
SELECT extract(epoch FROM now() - max(beat_at))::float8 FROM llm_proxy_heartbeats
"""


@dataclass(frozen=True)
class _Finish:
    claim: Claim
    request_id: str
    entry: str
    ttl: float
    delivery: Delivery | None
    listing: str


class PostgresBackend(Backend):
    def __init__(self, url: str, *, pool_size: int) -> None:
        self._db = Database(url, pool_size=pool_size)
        try:
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise
        self.queue: PostgresJobQueue = PostgresJobQueue(self._db)
        self.statuses: PostgresStatusStore = PostgresStatusStore(self._db)
        self.outbox: PostgresOutbox = PostgresOutbox(self._db)
        self.requests = PostgresRequestIndex(self._db)
        self._signals: list[WebSignals | WorkerSignals] = []
        self._finish = GroupCommit(self._finish_many, "cannot finish the request")

    def web_signals(self) -> WebSignals:
        signals = PostgresWebSignals(self._db)
        self._signals.append(signals)
        return signals

    def worker_signals(self) -> WorkerSignals:
        signals = PostgresWorkerSignals(self._db)
        self._signals.append(signals)
        return signals

    def concurrency_limit(self, max_concurrent: int) -> ConcurrencyLimit:
        return SharedLimit(max_concurrent, self.queue)

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
        stored = json.dumps(entry.to_dict())
        if claim is None and not withdraw:
            with self._db.transaction("cannot finish the request") as connection:
                self.statuses.put_in(connection, request_id, entry, ttl)
                if delivery is not None:
                    self.outbox.owe_in(connection, delivery)
            return True
        if claim is not None:
            return self._finish(_Finish(claim, request_id, stored, ttl, delivery, listing_json(entry)))
        rows = self._db.execute(
            "cannot finish the request",
            _WITHDRAW,
            {
                "request_id": request_id,
                "entry": stored,
                "ttl": ttl,
                "listing": listing_json(entry),
                "owes": delivery is not None,
                "owner": delivery.owner if delivery else "",
                "url": delivery.url if delivery else "",
                "payload": delivery.payload if delivery else "",
            },
        )
        return bool(rows and rows[0][0])

    def _finish_many(self, batch: list[_Finish]) -> list[bool]:
        rows = self._db.execute(
            "cannot finish the request",
            _FINISH_MANY,
            {
                "tickets": [f.claim.ticket for f in batch],
                "tokens": [f.claim.lease.token for f in batch],
                "request_ids": [f.request_id for f in batch],
                "entries": [f.entry for f in batch],
                "ttls": [f.ttl for f in batch],
                "owes": [f.delivery is not None for f in batch],
                "owners": [f.delivery.owner if f.delivery else "" for f in batch],
                "urls": [f.delivery.url if f.delivery else "" for f in batch],
                "payloads": [f.delivery.payload if f.delivery else "" for f in batch],
                "listings": [f.listing for f in batch],
            },
        )
        acked = {int(ticket) for (ticket,) in rows}
        return [f.claim.ticket in acked for f in batch]

    def keep_key(self, candidate: str) -> tuple[str, bool]:
        with self._db.transaction("cannot keep the generated key") as connection:
            created = connection.execute(
                "INSERT INTO llm_proxy_settings VALUES ('api_key', %s)"
                " ON CONFLICT DO NOTHING RETURNING value",
                (candidate,),
            ).fetchone()
            if created is not None:
                return candidate, True
            row = connection.execute("SELECT value FROM llm_proxy_settings WHERE name = 'api_key'").fetchone()
            return str(row[0]) if row else candidate, False

    def end_session(self, session: str, until: float) -> None:
        with self._db.transaction("cannot record a sign-out") as connection:
            # Sign-outs are rare: each one also drops the rows whose sessions expired.
            connection.execute("DELETE FROM llm_proxy_signed_out WHERE until <= now()")
            connection.execute(
                "INSERT INTO llm_proxy_signed_out VALUES (%s, to_timestamp(%s))"
                " ON CONFLICT (session) DO UPDATE SET until = excluded.until",
                (session, until),
            )

    def session_ended(self, session: str) -> bool:
        rows = self._db.execute(
            "cannot read sign-outs",
            "SELECT 1 FROM llm_proxy_signed_out WHERE session = %s AND until > now()",
            (session,),
        )
        return bool(rows)

    def describe_key_store(self) -> str:
        return "the database (DATABASE_URL)"

    def consumer_admitted(self) -> bool:
        return True

    @property
    def previous_holders_gone(self) -> bool:
        # Other workers may be alive: only lapsed leases are taken over.
        return False

    def beat(self, holder: str) -> None:
        self._checked("cannot record the worker's heartbeat", _BEAT, {"holder": holder})

    def probe(self) -> float | None:
        rows = self._checked("cannot read and write the database", _PROBE, None)
        age = rows[0][0] if rows else None
        return None if age is None else max(0.0, float(age))

    def _checked(self, what: str, sql: str, args: dict[str, str] | None) -> list[TupleRow]:
        """Any refusal is the store's failure here, one that ``Database`` leaves to the caller
        included: a read-only database (a standby after a failover, a full disk's read-only mode)
        refuses writes with errors that are not connection errors."""
        try:
            return self._db.execute(what, sql, args)
        except psycopg.Error as exc:
            raise StorageUnavailable(f"{what}: {exc}") from exc

    def close(self) -> None:
        for signals in self._signals:
            signals.close()
        self._db.close()
