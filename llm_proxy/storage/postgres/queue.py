"""The networked job queue: one table, claimed FIFO with ``FOR UPDATE SKIP LOCKED`` under leases.

The global ``MAX_CONCURRENT`` is counted inside the claiming transaction: claimers are serialised
by a transaction-level advisory lock, the claimed rows whose call is still running under a live
lease are the slots in use, and only the free ones are taken. No counter can drift: a worker that
dies frees its slots when its leases lapse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

from llm_proxy.domain.job import Job, body_digest, now_ms
from llm_proxy.storage.base import (
    ALL_MODELS,
    IDEMPOTENCY_WINDOW,
    CancelResult,
    Claim,
    IdempotencyConflict,
    JobQueue,
    Lease,
    Opening,
    QueueCounts,
    Queued,
    QueueFull,
    RateGate,
    Renewal,
    Submitted,
)
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.postgres.database import Connection, Database
from llm_proxy.storage.postgres.requests import COLUMNS as LISTED
from llm_proxy.storage.postgres.requests import ON_CONFLICT as LISTED_CHANGED
from llm_proxy.storage.postgres.requests import listing_json
from llm_proxy.storage.postgres.requests import values as listed_values

CLAIM_LOCK = 7_210_002
"""pg_advisory_xact_lock key serialising claimers, so two can never both take the last slot."""
COMPACT_LOCK = 7_210_004
PUT_LOCK = 7_210_006
"""pg_advisory_xact_lock key serialising puts that respect MAX_QUEUE, so that no two web processes
both take the last place."""
_WAITING = "SELECT coalesce(sum(n), 0) FROM llm_proxy_counts WHERE name = 'waiting'"
WORK_CHANNEL = "llm_proxy_work"

_INSERT = """
INSERT INTO llm_proxy_jobs (request_id, owner, body, submitted_at, relay, model)
VALUES (%s, %s, %s, %s, %s, %s) RETURNING ticket
"""
# Waiting jobs, oldest first, along the partial index of waiting rows (claimed jobs whose lease
# lapsed wait again through ``requeue_lapsed``, which every worker runs every third of a lease).
# A claim: its start in one round trip (``llm_proxy_claim_begin``, under the claim's advisory lock:
# the free slots, the rate-limit state, the oldest waiting jobs that fit), then, when the gate passed
# over some models, more candidates past them, then the admitted ones leased in one statement.
_START = "SELECT llm_proxy_claim_begin(%s, %s, %s, %s, %s)"
_CANDIDATES = """
SELECT ticket, request_id, model, body, owner, submitted_at, relay, state, cancel_requested
FROM llm_proxy_jobs
WHERE state < 2 AND model <> ALL(%(passed)s) AND ticket <> ALL(%(taken)s)
ORDER BY ticket LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
# The admitted jobs leased, and the first attempt's status of those given an opening stored in
# the same statement (the worker then writes nothing before its call).
_LEASE_ADMITTED = f"""
WITH leased AS (
    UPDATE llm_proxy_jobs
    SET state = 2, holder = %(holder)s, token = nextval('llm_proxy_lease_tokens'),
        lease_expires_at = now() + make_interval(secs => %(lease)s), calling = true
    WHERE ticket = ANY(%(tickets)s)
    RETURNING ticket, request_id, submitted_at, token, extract(epoch FROM lease_expires_at) AS expires_at
), opened AS (
    INSERT INTO llm_proxy_statuses (request_id, entry, expires_at, {LISTED})
    SELECT leased.request_id, o.entry, NULL, {listed_values("l", "leased.submitted_at")}
    FROM unnest(%(opened)s::bigint[], %(entries)s::text[], %(listings)s::text[]) AS o(ticket, entry, listing)
    JOIN leased USING (ticket)
    CROSS JOIN LATERAL json_populate_record(NULL::llm_proxy_listing, o.listing::json) AS l
    ON CONFLICT (request_id) DO UPDATE SET entry = excluded.entry, expires_at = excluded.expires_at,
        {LISTED_CHANGED}
)
SELECT ticket, token, expires_at FROM leased
"""  # noqa: S608
# A state stored as '{}' holds nothing (``Book.dump``): its row goes, with every other such row,
# unless it still says until when its model is held back (then only its state is emptied). The
# two parts touch different rows (one snapshot: a row being emptied here is not yet '{}').
_STORE_RATES = """
WITH given AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS given (model, state)),
gone AS (
    DELETE FROM llm_proxy_rates
    WHERE (state = '{}' OR model IN (SELECT model FROM given WHERE state = '{}'))
        AND model NOT IN (SELECT model FROM given WHERE state <> '{}')
        AND (throttled_until IS NULL OR throttled_until <= extract(epoch FROM now()))
)
INSERT INTO llm_proxy_rates (model, state) SELECT model, state FROM given
WHERE state <> '{}' OR model IN (
    SELECT model FROM llm_proxy_rates WHERE throttled_until > extract(epoch FROM now())
)
ON CONFLICT (model) DO UPDATE SET state = excluded.state
"""
_STORE_THROTTLES = """
INSERT INTO llm_proxy_rates (model, throttled_until) SELECT * FROM unnest(%s::text[], %s::float8[])
ON CONFLICT (model) DO UPDATE SET throttled_until = excluded.throttled_until
"""
# A waiting job's place in line, exact, counting the shorter side of it: the jobs ahead, or (in a
# deep queue, for the newest ones) the jobs behind, taken from the waiting count that the
# trigger keeps in the same snapshot.
_FIND = """
SELECT j.ticket, j.state, j.owner, j.submitted_at, j.body,
    CASE WHEN j.state >= 2 THEN NULL
    WHEN j.ticket - (SELECT min(ticket) FROM llm_proxy_jobs WHERE state < 2)
        <= (SELECT max(ticket) FROM llm_proxy_jobs WHERE state < 2) - j.ticket THEN
        (SELECT count(*) FROM llm_proxy_jobs AS w WHERE w.state < 2 AND w.ticket <= j.ticket)
    ELSE
        (SELECT sum(n) FROM llm_proxy_counts WHERE name = 'waiting')
        - (SELECT count(*) FROM llm_proxy_jobs AS w WHERE w.state < 2 AND w.ticket > j.ticket)
    END
FROM llm_proxy_jobs AS j WHERE j.request_id = %s AND j.state < 3
"""
_THROTTLED_UNTIL = """
SELECT max(throttled_until) FROM llm_proxy_rates
WHERE model IN (%s, '*') AND throttled_until > extract(epoch FROM now())
"""


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def _body(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


class _Candidate(NamedTuple):
    ticket: int
    job: Job
    model: str
    fresh: bool
    cancel_requested: bool

    @classmethod
    def of(cls, row: Sequence[Any]) -> _Candidate:
        ticket, request_id, model, body, owner, submitted_at, relay, state, cancel_requested = row
        job = Job(
            request_id=str(request_id),
            body=_body(str(body)),
            owner=str(owner),
            submitted_at=int(submitted_at),
            relay=bool(relay),
        )
        return cls(int(ticket), job, str(model), int(state) == 0, bool(cancel_requested))


def _admitted(
    connection: Connection, gate: RateGate, free: int, oldest: list[_Candidate], shared: dict[str, str]
) -> list[_Candidate]:
    """The candidates the gate admits, oldest first, passing over the models it holds back; their
    rate-limit state and throttles stored in the claim's transaction."""
    passed = set(gate.begin(shared))
    taken: list[_Candidate] = []
    candidates = oldest
    while ALL_MODELS not in passed and len(taken) < free:
        wanted = free - len(taken)
        # Jobs of a held-back model among the candidates: look past them for others.
        refused = False
        for candidate in candidates:
            if candidate.model in passed:
                refused = True
                continue
            if gate.admit(candidate.job.request_id, candidate.model, candidate.job.body):
                taken.append(candidate)
            else:
                passed.add(candidate.model)
                refused = True
        if not refused or len(candidates) < wanted:
            break
        rows = connection.execute(
            _CANDIDATES,
            {"passed": sorted(passed), "taken": [c.ticket for c in taken], "limit": free - len(taken)},
        ).fetchall()
        candidates = [_Candidate.of(row) for row in rows]
    states, throttles = gate.end()
    if states:
        connection.execute(_STORE_RATES, (list(states), list(states.values())))
    if throttles:
        connection.execute(_STORE_THROTTLES, (list(throttles), list(throttles.values())))
    return taken


class PostgresJobQueue(JobQueue):
    def __init__(self, database: Database, *, ceiling: int | None = None) -> None:
        self._db = database
        self._ceiling = ceiling
        # Claims of this worker whose upstream call is over, not yet finished (lease, token).
        self._ended: dict[int, int] = {}
        # Concurrent submits share one transaction, so one commit to disk covers a batch.
        self._put = GroupCommit(self._insert_many, "cannot store the job")
        # Concurrent callers (every submit asks) share one read, started after each of them asked.
        self._counts = GroupCommit(self._count_for, "cannot read the job queue")
        self._share = GroupCommit(self._share_many, "cannot record rate limits")

    def with_ceiling(self, ceiling: int) -> None:
        """The global MAX_CONCURRENT this process's claims respect (set by the worker)."""
        self._ceiling = ceiling

    def call_ended(self, claim: Claim) -> None:
        """The claim's upstream call is over: its slot no longer counts against the ceiling,
        from this worker's next claim on (its finish may not be committed yet)."""
        self._ended[claim.ticket] = claim.lease.token

    def put(self, job: Job, *, max_waiting: int | None = None) -> int:
        ticket = self._put((job, max_waiting))
        if ticket is None:
            raise QueueFull(max_waiting or 0)
        return ticket

    def _insert_many(self, items: list[tuple[Job, int | None]]) -> list[int | None]:
        with self._db.durable("cannot store the job") as connection:
            waiting = self._waiting(connection, any(limit is not None for _, limit in items))
            tickets: list[int | None] = []
            for job, limit in items:
                if limit is not None and waiting >= limit:
                    tickets.append(None)
                    continue
                waiting += 1
                tickets.append(self._insert(connection, job))
            return tickets

    @staticmethod
    def _waiting(connection: Connection, limited: bool) -> int:
        """The waiting count, exact until this transaction ends when ``limited`` (0 otherwise)."""
        if not limited:
            return 0
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (PUT_LOCK,))
        row = connection.execute(_WAITING).fetchone()
        return int(row[0]) if row else 0

    def _insert(self, connection: Connection, job: Job) -> int:
        row = connection.execute(
            _INSERT, (job.request_id, job.owner, job.body_json, job.submitted_at, job.relay, _model(job.body))
        ).fetchone()
        connection.execute("SELECT pg_notify(%s, '')", (WORK_CHANNEL,))
        return int(row[0]) if row else 0

    def put_once(self, job: Job, key: str, *, max_waiting: int | None = None) -> Submitted:
        digest = body_digest(job.body)
        with self._db.durable("cannot store the job") as connection:
            # A racing submit with the same key waits here until this one commits, then finds it.
            created = connection.execute(
                "INSERT INTO llm_proxy_idempotency (owner, key, request_id, body_hash)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (owner, key) DO NOTHING RETURNING request_id",
                (job.owner, key, job.request_id, digest),
            ).fetchone()
            if created is None:
                earlier = connection.execute(
                    "SELECT request_id, body_hash, created_at > now() - make_interval(secs => %s)"
                    " FROM llm_proxy_idempotency WHERE owner = %s AND key = %s FOR UPDATE",
                    (IDEMPOTENCY_WINDOW, job.owner, key),
                ).fetchone()
                if earlier is not None and earlier[2]:
                    if earlier[1] != digest:
                        raise IdempotencyConflict(str(earlier[0]))
                    return Submitted(str(earlier[0]), replayed=True)
                # Used longer ago than the window: the key is free again.
                connection.execute(
                    "UPDATE llm_proxy_idempotency SET request_id = %s, body_hash = %s, created_at = now()"
                    " WHERE owner = %s AND key = %s",
                    (job.request_id, digest, job.owner, key),
                )
            if max_waiting is not None and self._waiting(connection, True) >= max_waiting:
                # Rolled back with the key: a retry of this submit may get in later.
                raise QueueFull(max_waiting)
            self._insert(connection, job)
        return Submitted(job.request_id, replayed=False)

    def find(self, request_id: str) -> Queued | None:
        rows = self._db.execute("cannot read the job queue", _FIND, (request_id,))
        if not rows:
            return None
        ticket, state, owner, submitted_at, body, position = rows[0]
        throttled_until = None
        if position is not None:
            until = self._db.execute("cannot read the job queue", _THROTTLED_UNTIL, (_model(_body(body)),))
            if until and until[0][0] is not None:
                throttled_until = int(float(until[0][0]) * 1000)
        return Queued(
            ticket=int(ticket),
            request_id=request_id,
            owner=str(owner),
            submitted_at=int(submitted_at),
            body_json=str(body),
            in_flight=int(state) == 2,
            fresh=int(state) == 0,
            position=None if position is None else int(position),
            throttled_until=throttled_until,
        )

    def claim_many(
        self,
        limit: int,
        *,
        holder: str,
        lease_seconds: float,
        gate: RateGate | None = None,
        opening: Opening | None = None,
    ) -> list[Claim]:
        # Without a ceiling (no worker set one: tests, tools) nothing but ``limit`` bounds a claim.
        ceiling = self._ceiling if self._ceiling is not None else 2**31 - 1
        ended, self._ended = self._ended, {}
        try:
            with self._db.transaction("cannot claim jobs") as connection:
                return self._claim_in(connection, limit, ceiling, holder, lease_seconds, gate, opening, ended)
        except BaseException:
            self._ended.update(ended)
            raise

    @staticmethod
    def _claim_in(
        connection: Connection,
        limit: int,
        ceiling: int,
        holder: str,
        lease_seconds: float,
        gate: RateGate | None,
        opening: Opening | None,
        ended: dict[int, int],
    ) -> list[Claim]:
        row = connection.execute(
            _START, (CLAIM_LOCK, list(ended), list(ended.values()), limit, ceiling)
        ).fetchone()
        start: dict[str, Any] = row[0] if row else {"free": 0, "rates": {}, "candidates": []}
        oldest = [_Candidate.of(candidate) for candidate in start["candidates"]]
        if gate is None:
            taken = oldest
        else:
            rates = {str(m): str(s) for m, s in start["rates"].items()}
            taken = _admitted(connection, gate, int(start["free"]), oldest, rates)
        if not taken:
            return []
        opened_at = now_ms()
        opened = [c for c in taken if c.fresh and not c.cancel_requested] if opening is not None else []
        entries = [opening(c.job, opened_at) for c in opened] if opening is not None else []
        leased = connection.execute(
            _LEASE_ADMITTED,
            {
                "holder": holder,
                "lease": lease_seconds,
                "tickets": [c.ticket for c in taken],
                "opened": [c.ticket for c in opened],
                "entries": [json.dumps(entry.to_dict()) for entry in entries],
                "listings": [listing_json(entry) for entry in entries],
            },
        ).fetchall()
        leases = {int(ticket): (int(token), float(expires_at)) for ticket, token, expires_at in leased}
        opened_tickets = {c.ticket for c in opened}
        return [
            Claim(
                ticket=c.ticket,
                job=c.job,
                lease=Lease(holder=holder, token=leases[c.ticket][0], expires_at=leases[c.ticket][1]),
                fresh=c.fresh,
                cancel_requested=c.cancel_requested,
                opened_at=opened_at if c.ticket in opened_tickets else None,
            )
            for c in sorted(taken, key=lambda c: c.ticket)
        ]

    def share_rates(
        self, models: Collection[str], change: Callable[[Mapping[str, str] | None], dict[str, str]]
    ) -> None:
        self._share((list(models), change))

    def _share_many(
        self, items: list[tuple[list[str], Callable[[Mapping[str, str] | None], dict[str, str]]]]
    ) -> list[None]:
        """Concurrent changes share one transaction, each seeing the state the one before left."""
        wanted = sorted({model for models, _ in items for model in models})
        with self._db.transaction("cannot record rate limits") as connection:
            # The claims' lock: a claim reads and writes the same rows.
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            state = {
                str(model): str(text)
                for model, text in connection.execute(
                    "SELECT model, state FROM llm_proxy_rates WHERE model = ANY(%s)", (wanted,)
                ).fetchall()
            }
            changed: dict[str, str] = {}
            for models, change in items:
                stored = change({model: state[model] for model in models if model in state})
                state.update(stored)
                changed.update(stored)
            if changed:
                connection.execute(_STORE_RATES, (list(changed), list(changed.values())))
        return [None] * len(items)

    def renew(self, claims: list[Claim], lease_seconds: float) -> Renewal:
        if not claims:
            return Renewal(set())
        rows = self._db.execute(
            "cannot renew leases",
            # Rows locked in ticket order, as finishes lock them (see backend._FINISH_MANY).
            "UPDATE llm_proxy_jobs SET lease_expires_at = now() + make_interval(secs => %s)"
            " WHERE ticket IN (SELECT ticket FROM llm_proxy_jobs"
            " WHERE state = 2 AND lease_expires_at > now()"
            " AND (ticket, token) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))"
            " ORDER BY ticket FOR UPDATE)"
            " RETURNING ticket, token, cancel_requested",
            (lease_seconds, [c.ticket for c in claims], [c.lease.token for c in claims]),
        )
        return Renewal(
            held={(int(ticket), int(token)) for ticket, token, _ in rows},
            cancelled={int(ticket) for ticket, _, cancelled in rows if cancelled},
        )

    def holds(self, claim: Claim) -> bool:
        rows = self._db.execute(
            "cannot read the job queue",
            "SELECT 1 FROM llm_proxy_jobs WHERE ticket = %s AND token = %s AND state = 2",
            (claim.ticket, claim.lease.token),
        )
        return bool(rows)

    def ack(self, claim: Claim) -> bool:
        with self._db.transaction("cannot ack a job") as connection:
            return self.ack_in(connection, claim)

    @staticmethod
    def ack_in(connection: Connection, claim: Claim) -> bool:
        """Ack inside the caller's transaction: True when the lease was current."""
        cursor = connection.execute(
            "UPDATE llm_proxy_jobs SET state = 3, calling = false, finished_at = now()"
            " WHERE ticket = %s AND token = %s AND state = 2",
            (claim.ticket, claim.lease.token),
        )
        return cursor.rowcount == 1

    def release(self, claim: Claim) -> bool:
        with self._db.transaction("cannot release the job") as connection:
            cursor = connection.execute(
                "UPDATE llm_proxy_jobs SET state = 1, holder = NULL, calling = false"
                " WHERE ticket = %s AND token = %s AND state = 2",
                (claim.ticket, claim.lease.token),
            )
            if cursor.rowcount == 1:
                connection.execute("SELECT pg_notify(%s, '')", (WORK_CHANNEL,))
            return cursor.rowcount == 1

    def requeue_lapsed(self, before: float) -> int:
        # The database's clock, not the caller's: leases are stamped by it.
        condition, args = ("true", ()) if math.isinf(before) else ("lease_expires_at < now()", ())
        rows = self._db.execute(
            "cannot requeue lapsed jobs",
            "UPDATE llm_proxy_jobs SET state = 1, holder = NULL, calling = false"  # noqa: S608 - constant
            f" WHERE state = 2 AND {condition} RETURNING ticket",
            args,
        )
        return len(rows)

    def cancel(self, request_id: str) -> CancelResult:
        with self._db.transaction("cannot cancel the job") as connection:
            row = connection.execute(
                "SELECT ticket, state FROM llm_proxy_jobs WHERE request_id = %s FOR UPDATE", (request_id,)
            ).fetchone()
            if row is None or int(row[1]) == 3:
                return CancelResult.ABSENT
            if int(row[1]) < 2:
                connection.execute(
                    "UPDATE llm_proxy_jobs SET state = 3, finished_at = now() WHERE ticket = %s", (row[0],)
                )
                return CancelResult.WITHDRAWN
            connection.execute(
                "UPDATE llm_proxy_jobs SET cancel_requested = true WHERE ticket = %s", (row[0],)
            )
            return CancelResult.SIGNALLED

    def throttles(self) -> dict[str, float]:
        rows = self._db.execute(
            "cannot read the job queue",
            "SELECT model, throttled_until FROM llm_proxy_rates"
            " WHERE throttled_until > extract(epoch FROM now())",
        )
        return {str(model): float(until) for model, until in rows}

    def cancel_requested(self, request_id: str) -> bool:
        rows = self._db.execute(
            "cannot read the job queue",
            "SELECT 1 FROM llm_proxy_jobs WHERE request_id = %s AND cancel_requested AND state = 2",
            (request_id,),
        )
        return bool(rows)

    def counts(self) -> QueueCounts:
        return self._counts(None)

    def _count_for(self, callers: list[None]) -> list[QueueCounts]:
        rows = self._db.execute(
            "cannot read the job queue", "SELECT name, sum(n) FROM llm_proxy_counts GROUP BY name"
        )
        found = {str(name): int(n) for name, n in rows}
        counts = QueueCounts(waiting=found.get("waiting", 0), in_flight=found.get("in_flight", 0))
        return [counts] * len(callers)

    def compact(self) -> int:
        with self._db.alone("cannot compact the job queue", COMPACT_LOCK) as connection:
            if connection is None:
                return 0
            connection.execute(
                "DELETE FROM llm_proxy_idempotency WHERE created_at < now() - make_interval(secs => %s)",
                (IDEMPOTENCY_WINDOW,),
            )
            return int(connection.execute("DELETE FROM llm_proxy_jobs WHERE state = 3").rowcount)

    def close(self) -> None:
        """The database is closed by the back end that opened it."""
