"""The embedded job queue: persist-queue's SQLite table, read and written with our own SQL.

persist-queue creates the table and defines its format (``selfcheck`` verifies both at start-up);
every query is ours, because persist-queue's own were measured to fall short here:
- its blocking ``get`` re-reads only every 10 s across processes: we only claim without blocking,
  and the worker is woken by the back end's signals;
- its counters are per process: counts come from triggers, exact for every process;
- its ``ack`` matches by object identity (a copy silently does nothing): we ack by row id;
- its ``get`` scans from id 0, slowing down as acked rows pile up: claims start at the oldest
  waiting id;
- its ``resume_unack_tasks`` resets rows a live worker holds: claims carry leases instead, and only
  lapsed ones wait again.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import persistqueue
import persistqueue.serializers.json as json_serializer

from llm_proxy.domain.job import Job, body_digest
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
    StorageUnavailable,
    Submitted,
)
from llm_proxy.storage.batching import GroupCommit
from llm_proxy.storage.sqlite import requests
from llm_proxy.storage.sqlite.transactions import (
    BUSY_WAIT,
    OPEN_TIMEOUT,
    PATIENCE,
    immediate,
    retrying,
)

QUEUE_NAME = "jobs"
TABLE = f"ack_queue_{QUEUE_NAME}"
COLUMNS = ("_id", "data", "timestamp", "status")
"""persist-queue's table layout, as ``selfcheck`` expects it."""
# persist-queue's AckStatus values: 0 inited, 1 ready (both "waiting"), 2 unack (in flight), 5 acked.
INITED, READY, IN_FLIGHT, ACKED = 0, 1, 2, 5


def _bucket(row: str) -> str:
    return (
        f"CASE WHEN {row}.status < {IN_FLIGHT} THEN 'waiting'"
        f" WHEN {row}.status = {IN_FLIGHT} THEN 'in_flight' ELSE '' END"
    )


# Exact waiting / in-flight counts for every process, kept by triggers in the same transaction as
# the change: a COUNT(*) per submit would cost O(backlog), and persist-queue's own counters are
# per process. The (status, _id) index serves positions, claims and the oldest waiting row.
_SCHEMA = f"""
CREATE INDEX IF NOT EXISTS {TABLE}_status_id ON {TABLE} (status, _id);
CREATE TABLE IF NOT EXISTS {TABLE}_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO {TABLE}_counts VALUES
    ('waiting', (SELECT COUNT(*) FROM {TABLE} WHERE status < {IN_FLIGHT})),
    ('in_flight', (SELECT COUNT(*) FROM {TABLE} WHERE status = {IN_FLIGHT}));
CREATE TRIGGER IF NOT EXISTS {TABLE}_count_insert AFTER INSERT ON {TABLE} BEGIN
    UPDATE {TABLE}_counts SET n = n + 1 WHERE name = {_bucket("NEW")};
END;
CREATE TRIGGER IF NOT EXISTS {TABLE}_count_update AFTER UPDATE OF status ON {TABLE}
WHEN {_bucket("OLD")} != {_bucket("NEW")} BEGIN
    UPDATE {TABLE}_counts SET n = n - 1 WHERE name = {_bucket("OLD")};
    UPDATE {TABLE}_counts SET n = n + 1 WHERE name = {_bucket("NEW")};
END;
CREATE TRIGGER IF NOT EXISTS {TABLE}_count_delete AFTER DELETE ON {TABLE} BEGIN
    UPDATE {TABLE}_counts SET n = n - 1 WHERE name = {_bucket("OLD")};
END;
CREATE TABLE IF NOT EXISTS {TABLE}_ids (request_id TEXT PRIMARY KEY, ticket INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {TABLE}_cancels (request_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {TABLE}_idempotency (
    owner TEXT NOT NULL, key TEXT NOT NULL, request_id TEXT NOT NULL, body_hash TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (owner, key)) WITHOUT ROWID;
INSERT OR IGNORE INTO {TABLE}_counts VALUES ('lease_token', 0);
CREATE TABLE IF NOT EXISTS {TABLE}_leases (
    ticket INTEGER PRIMARY KEY, holder TEXT NOT NULL, token INTEGER NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS {TABLE}_leases_holder ON {TABLE}_leases (holder);
INSERT OR IGNORE INTO {TABLE}_counts VALUES ('identity', random());
"""
# Until when a rate limit holds each model back (seconds since the epoch), as the worker's last
# claim found, for a waiting job's status; ``*`` stands for every model.
_RATE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE}_throttles (model TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
"""
_THROTTLE = f"INSERT OR REPLACE INTO {TABLE}_throttles (model, until) VALUES (?, ?)"
_THROTTLED_UNTIL = f"""
SELECT MAX(until) FROM {TABLE}_throttles WHERE model IN (?, '{ALL_MODELS}') AND until > ?
"""
_FIND_KEY = (
    f"SELECT request_id, body_hash FROM {TABLE}_idempotency WHERE owner = ? AND key = ? AND created_at > ?"
)
_RECORD_KEY = f"INSERT OR REPLACE INTO {TABLE}_idempotency VALUES (?, ?, ?, ?, ?)"
_OLDEST_WAITING = f"""(SELECT MIN(m) FROM (SELECT MIN(_id) AS m FROM {TABLE} WHERE status = {INITED}
                         UNION ALL SELECT MIN(_id) FROM {TABLE} WHERE status = {READY}))"""
# A job found by request id, with its place in line when it waits, counted from whichever end of
# the line is nearer (O(distance), not O(backlog)); CASE runs only the count it picks. The body
# comes out as JSON text, never decoded.
_FIND = f"""
WITH r AS (
    SELECT t._id AS ticket, t.status AS status, t.data AS data
    FROM {TABLE}_ids AS i JOIN {TABLE} AS t ON t._id = i.ticket
    WHERE i.request_id = :request_id AND t.status < {ACKED}),
e AS (SELECT {_OLDEST_WAITING} AS oldest, (SELECT MAX(_id) FROM {TABLE}) AS newest)
SELECT r.ticket, r.status, json_extract(r.data, '$.owner'), json_extract(r.data, '$.submitted_at'),
    json_extract(r.data, '$.body'),
    CASE
        WHEN r.status >= {IN_FLIGHT} THEN NULL
        WHEN r.ticket - e.oldest <= e.newest - r.ticket
            THEN (SELECT COUNT(*) FROM {TABLE} WHERE status IN ({INITED}, {READY}) AND _id <= r.ticket)
        ELSE (SELECT n FROM {TABLE}_counts WHERE name = 'waiting')
            - (SELECT COUNT(*) FROM {TABLE} WHERE status IN ({INITED}, {READY}) AND _id > r.ticket)
    END
FROM r, e
"""

# Rows in persist-queue's own format (json serializer, status 0 = inited).
_INSERT_JOB = f"INSERT INTO {TABLE} (data, timestamp, status) VALUES (?, ?, {INITED})"
_INSERT_ID = f"INSERT OR REPLACE INTO {TABLE}_ids (request_id, ticket) VALUES (?, ?)"
# The oldest waiting jobs: start at the oldest waiting id (index) and walk the rowid order from
# there, so finished rows not yet compacted away are never scanned.
_CLAIM = f"""
SELECT _id, data, status,
    EXISTS (SELECT 1 FROM {TABLE}_cancels WHERE request_id = json_extract(data, '$.request_id'))
FROM {TABLE} NOT INDEXED
WHERE status < {IN_FLIGHT} AND _id >= {_OLDEST_WAITING}
ORDER BY _id LIMIT ?
"""
# The same, passing over the jobs of the models a rate limit holds back (a JSON list): the walk
# reads the held-back jobs' rows on its way, which costs only while such a backlog waits ahead.
_CLAIM_PASSING = f"""
SELECT _id, data, status,
    EXISTS (SELECT 1 FROM {TABLE}_cancels WHERE request_id = json_extract(data, '$.request_id'))
FROM {TABLE} NOT INDEXED
WHERE status < {IN_FLIGHT} AND _id >= {_OLDEST_WAITING}
    AND coalesce(json_extract(data, '$.body.model'), '') NOT IN (SELECT value FROM json_each(?))
ORDER BY _id LIMIT ?
"""
_MARK_CLAIMED = f"UPDATE {TABLE} SET status = {IN_FLIGHT} WHERE _id = ?"
# One token per claiming commit, from a counter that only grows: a lease taken after another never
# carries the same token, and a whole batch is leased in one statement.
_NEXT_TOKEN = f"UPDATE {TABLE}_counts SET n = n + 1 WHERE name = 'lease_token' RETURNING n"
_LEASE = f"INSERT OR REPLACE INTO {TABLE}_leases (ticket, holder, token, expires_at) VALUES (?, ?, ?, ?)"
_CURRENT = f"EXISTS (SELECT 1 FROM {TABLE}_leases WHERE ticket = :ticket AND token = :token)"
_ACK = f"UPDATE {TABLE} SET status = {ACKED} WHERE _id = :ticket AND status = {IN_FLIGHT} AND {_CURRENT}"
_ACKED_UNDER = f"SELECT 1 FROM {TABLE} WHERE _id = :ticket AND status = {ACKED} AND {_CURRENT}"
_RELEASE = f"UPDATE {TABLE} SET status = {READY} WHERE _id = :ticket AND status = {IN_FLIGHT} AND {_CURRENT}"
_HOLDING = (
    f"SELECT l.ticket, l.token FROM {TABLE}_leases AS l JOIN {TABLE} AS t ON t._id = l.ticket"
    f" WHERE t.status = {IN_FLIGHT} AND l.ticket IN ({{marks}})"
)
_RENEW = f"""
UPDATE {TABLE}_leases SET expires_at = :expires_at
WHERE ticket = :ticket AND token = :token AND expires_at >= :now
    AND EXISTS (SELECT 1 FROM {TABLE} WHERE _id = :ticket AND status = {IN_FLIGHT})
"""
# In flight without a live lease: its holder is gone (rows claimed before leases existed count too).
_REQUEUE = f"""
UPDATE {TABLE} SET status = {READY} WHERE status = {IN_FLIGHT} AND NOT EXISTS
    (SELECT 1 FROM {TABLE}_leases AS l WHERE l.ticket = {TABLE}._id AND l.expires_at >= ?)
"""


@dataclass(frozen=True)
class _Inserted:
    ticket: int


@dataclass(frozen=True)
class _KeyUsed:
    request_id: str
    same_body: bool


@dataclass(frozen=True)
class _Full:
    limit: int


class PersistJobQueue(JobQueue):
    def __init__(self, directory: Path, *, patience: float = PATIENCE) -> None:
        self._patience = patience
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Creates the table in persist-queue's layout; auto_resume=False because resuming
            # would reset rows a live worker holds.
            queue = persistqueue.SQLiteAckQueue(
                str(directory),
                name=QUEUE_NAME,
                auto_resume=False,
                timeout=OPEN_TIMEOUT,
                serializer=json_serializer,
            )
            queue.close()
            path = str(directory / "data.db")
            self._reader = sqlite3.connect(path, timeout=OPEN_TIMEOUT, isolation_level=None)
            try:
                # One transaction: web and worker may both set this up at the same moment.
                self._reader.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} {requests.SCHEMA} {_RATE_SCHEMA} COMMIT;"
                )
            finally:
                if self._reader.in_transaction:
                    self._reader.execute("ROLLBACK")
            self._writer = sqlite3.connect(path, isolation_level=None)
            # Claims and acks need no fsync: after a crash a lost claim lapses and waits again,
            # and a lost ack only hands out a job whose final status is already stored.
            self._claimer = sqlite3.connect(path, isolation_level=None)
            for connection in (self._reader, self._writer, self._claimer):
                connection.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT * 1000)}")
            self._writer.execute("PRAGMA synchronous = FULL")
            self._claimer.execute("PRAGMA synchronous = NORMAL")
            self._put = GroupCommit(
                self._insert, "cannot store the job", functools.partial(retrying, patience=patience)
            )
            self._ack = GroupCommit(
                self._mark_acked, "cannot ack a job", functools.partial(retrying, patience=patience)
            )
            self._holds = GroupCommit(
                self._current, "cannot read leases", functools.partial(retrying, patience=patience)
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(f"cannot open the job queue in {directory}: {exc}") from exc

    def put(self, job: Job, *, max_waiting: int | None = None) -> int:
        stored = self._put((json_serializer.dumps(job.to_dict()), job, None, max_waiting))
        if isinstance(stored, _Full):
            raise QueueFull(stored.limit)
        if not isinstance(stored, _Inserted):  # without a key no replay can come back
            raise TypeError(f"unexpected result of a put: {stored!r}")
        return stored.ticket

    def put_once(self, job: Job, key: str, *, max_waiting: int | None = None) -> Submitted:
        stored = self._put((json_serializer.dumps(job.to_dict()), job, key, max_waiting))
        if isinstance(stored, _Full):
            raise QueueFull(stored.limit)
        if isinstance(stored, _Inserted):
            return Submitted(job.request_id, replayed=False)
        if not stored.same_body:
            raise IdempotencyConflict(stored.request_id)
        return Submitted(stored.request_id, replayed=True)

    def _insert(
        self, items: list[tuple[bytes, Job, str | None, int | None]]
    ) -> list[_Inserted | _KeyUsed | _Full]:
        """Keys are checked and recorded in the same transaction as the jobs, so two racing submits
        with one key queue once; the waiting count is read in it too (the write lock is held), so
        no two submits both take the last place."""
        results: list[_Inserted | _KeyUsed | _Full] = []
        now = time.time()
        with immediate(self._writer) as connection:
            row = connection.execute(f"SELECT n FROM {TABLE}_counts WHERE name = 'waiting'").fetchone()
            waiting = int(row[0]) if row else 0
            for data, job, key, max_waiting in items:
                digest = body_digest(job.body) if key is not None else ""
                if key is not None:
                    earlier = connection.execute(
                        _FIND_KEY, (job.owner, key, now - IDEMPOTENCY_WINDOW)
                    ).fetchone()
                    if earlier is not None:
                        results.append(_KeyUsed(str(earlier[0]), same_body=earlier[1] == digest))
                        continue
                if max_waiting is not None and waiting >= max_waiting:
                    results.append(_Full(max_waiting))
                    continue
                waiting += 1
                ticket = int(connection.execute(_INSERT_JOB, (data, now)).lastrowid or 0)
                connection.execute(_INSERT_ID, (job.request_id, ticket))
                # Listed from now on (the dashboard), at no extra commit.
                requests.submitted(connection, job)
                if key is not None:
                    connection.execute(_RECORD_KEY, (job.owner, key, job.request_id, digest, now))
                results.append(_Inserted(ticket))
        return results

    def find(self, request_id: str) -> Queued | None:
        row = retrying(
            "cannot read the job queue",
            lambda: self._reader.execute(_FIND, {"request_id": request_id}).fetchone(),
            self._patience,
        )
        if row is None:
            return None
        ticket, status, owner, submitted_at, body_json, position = row
        throttled_until = None
        if position is not None:
            model = json.loads(body_json).get("model") if body_json else None
            until = self._scalar(_THROTTLED_UNTIL, (str(model or ""), time.time()))
            throttled_until = None if until is None else int(float(until) * 1000)
        return Queued(
            ticket=int(ticket),
            request_id=request_id,
            owner=str(owner),
            submitted_at=int(submitted_at or 0),
            body_json=str(body_json),
            in_flight=int(status) >= IN_FLIGHT,
            fresh=int(status) == INITED,
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
        # The queue and the statuses are separate files: the opening cannot share the claim's
        # commit, so the worker writes it.
        expires_at = time.time() + lease_seconds

        def take() -> tuple[list[Any], int]:
            with immediate(self._claimer) as connection:
                if gate is None:
                    rows = connection.execute(_CLAIM, (limit,)).fetchall()
                else:
                    rows = self._admitted(connection, limit, gate)
                if not rows:
                    return [], 0
                connection.executemany(_MARK_CLAIMED, [(row[0],) for row in rows])
                token = int(connection.execute(_NEXT_TOKEN).fetchone()[0])
                connection.executemany(_LEASE, [(row[0], holder, token, expires_at) for row in rows])
                return rows, token

        rows, token = retrying("cannot claim jobs", take, self._patience)
        return [
            Claim(
                ticket=int(ticket),
                job=Job.from_dict(json_serializer.loads(data)),
                lease=Lease(holder=holder, token=int(token), expires_at=expires_at),
                fresh=int(status) == INITED,
                cancel_requested=bool(cancelled),
            )
            for ticket, data, status, cancelled in rows
        ]

    @staticmethod
    def _admitted(connection: sqlite3.Connection, limit: int, gate: RateGate) -> list[Any]:
        """The oldest waiting jobs the gate admits, in ticket order. A model refused on the way is
        passed over from then on; when that leaves room, the walk goes on past it."""
        passed = set(gate.begin(None))
        taken: list[Any] = []
        while ALL_MODELS not in passed and len(taken) < limit:
            wanted = limit - len(taken)
            rows = connection.execute(_CLAIM_PASSING, (json.dumps(sorted(passed)), wanted)).fetchall()
            refused = False
            for row in rows:
                job = json_serializer.loads(row[1])
                body = job.get("body") or {}
                model = str(body.get("model") or "")
                if model in passed:
                    continue
                if gate.admit(str(job["request_id"]), model, body):
                    # Marked at once, so the next walk does not offer it again.
                    connection.execute(_MARK_CLAIMED, (row[0],))
                    taken.append(row)
                else:
                    passed.add(model)
                    refused = True
            if not refused or len(rows) < wanted:
                break
        _, throttles = gate.end()
        connection.executemany(_THROTTLE, list(throttles.items()))
        return taken

    def share_rates(
        self, models: Collection[str], change: Callable[[Mapping[str, str] | None], dict[str, str]]
    ) -> None:
        # One worker per DATA_DIR: its own memory is the only state there is.
        change(None)

    def renew(self, claims: list[Claim], lease_seconds: float) -> Renewal:
        expires_at = time.time() + lease_seconds

        def extend() -> Renewal:
            held = set()
            cancelled = set()
            with immediate(self._claimer) as connection:
                for claim in claims:
                    args = {
                        "ticket": claim.ticket,
                        "token": claim.lease.token,
                        "expires_at": expires_at,
                        "now": time.time(),
                    }
                    if connection.execute(_RENEW, args).rowcount == 1:
                        held.add((claim.ticket, claim.lease.token))
                        if connection.execute(
                            f"SELECT 1 FROM {TABLE}_cancels WHERE request_id = ?", (claim.job.request_id,)
                        ).fetchone():
                            cancelled.add(claim.ticket)
            return Renewal(held, cancelled)

        return retrying("cannot renew leases", extend, self._patience)

    def holds(self, claim: Claim) -> bool:
        return bool(self._holds(claim))

    def _current(self, claims: list[Claim]) -> list[bool]:
        """Which claims' leases are current, in one query per few hundred (a query per finishing
        job was measured to cost the worker 5-8 % of its completions per second)."""
        current: set[tuple[int, int]] = set()
        for start in range(0, len(claims), 500):
            tickets = [c.ticket for c in claims[start : start + 500]]
            current.update(self._reader.execute(_HOLDING.format(marks=",".join("?" * len(tickets))), tickets))
        return [(c.ticket, c.lease.token) in current for c in claims]

    def ack(self, claim: Claim) -> bool:
        return bool(self._ack(claim))

    def _mark_acked(self, claims: list[Claim]) -> list[bool]:
        leases = [{"ticket": c.ticket, "token": c.lease.token} for c in claims]
        with immediate(self._claimer) as connection:
            # One statement for the batch; only when it acked fewer than asked (rare: a stale lease)
            # is each claim's lease looked up to tell which.
            if connection.executemany(_ACK, leases).rowcount == len(claims):
                done = [True] * len(claims)
            else:
                done = [
                    connection.execute(f"SELECT {_CURRENT}", lease).fetchone()[0] == 1 for lease in leases
                ]
            connection.executemany(
                f"DELETE FROM {TABLE}_leases WHERE ticket = ?",
                [(c.ticket,) for c, acked in zip(claims, done, strict=True) if acked],
            )
        return done

    def release(self, claim: Claim) -> bool:
        def mark() -> bool:
            with immediate(self._claimer) as connection:
                args = {"ticket": claim.ticket, "token": claim.lease.token}
                return connection.execute(_RELEASE, args).rowcount == 1

        return retrying(f"cannot release job {claim.ticket}", mark, self._patience)

    def requeue_lapsed(self, before: float) -> int:
        def requeue() -> int:
            with immediate(self._claimer) as connection:
                return int(connection.execute(_REQUEUE, (min(before, 1e300),)).rowcount)

        return retrying("cannot requeue lapsed jobs", requeue, self._patience)

    def cancel(self, request_id: str) -> CancelResult:
        def mark() -> CancelResult:
            with immediate(self._writer) as connection:
                row = connection.execute(
                    f"SELECT t._id, t.status FROM {TABLE}_ids AS i JOIN {TABLE} AS t ON t._id = i.ticket"
                    " WHERE i.request_id = ?",
                    (request_id,),
                ).fetchone()
                if row is None or int(row[1]) >= ACKED:
                    return CancelResult.ABSENT
                if int(row[1]) < IN_FLIGHT:
                    connection.execute(f"UPDATE {TABLE} SET status = {ACKED} WHERE _id = ?", (row[0],))
                    return CancelResult.WITHDRAWN
                connection.execute(f"INSERT OR IGNORE INTO {TABLE}_cancels VALUES (?)", (request_id,))
                return CancelResult.SIGNALLED

        return retrying("cannot cancel the job", mark, self._patience)

    def withdraw(self, request_id: str) -> bool:
        """Take a waiting job out of the queue (it will never be handed out); False if it does not
        wait. For the back end's ``finish``: the API cancels through ``cancel``."""

        def take_out() -> bool:
            with immediate(self._writer) as connection:
                return (
                    connection.execute(
                        f"UPDATE {TABLE} SET status = {ACKED} WHERE status < {IN_FLIGHT}"
                        f" AND _id = (SELECT ticket FROM {TABLE}_ids WHERE request_id = ?)",
                        (request_id,),
                    ).rowcount
                    == 1
                )

        return retrying("cannot withdraw the job", take_out, self._patience)

    def throttles(self) -> dict[str, float]:
        rows = retrying(
            "cannot read the job queue",
            lambda: self._reader.execute(
                f"SELECT model, until FROM {TABLE}_throttles WHERE until > ?",
                (time.time(),),
            ).fetchall(),
            self._patience,
        )
        return {str(model): float(until) for model, until in rows}

    def cancel_requested(self, request_id: str) -> bool:
        return self._scalar(f"SELECT 1 FROM {TABLE}_cancels WHERE request_id = ?", (request_id,)) is not None

    def _scalar(self, sql: str, args: tuple[Any, ...]) -> Any:
        row = retrying(
            "cannot read the job queue", lambda: self._reader.execute(sql, args).fetchone(), self._patience
        )
        return row[0] if row else None

    def identity(self) -> int:
        """A random number drawn when this database was created: it tells the database from a new
        one made in its place (``selfcheck.queue_problem``)."""
        return int(self._scalar(f"SELECT n FROM {TABLE}_counts WHERE name = 'identity'", ()))

    def counts(self) -> QueueCounts:
        rows = retrying(
            "cannot read the job queue",
            lambda: self._reader.execute(f"SELECT name, n FROM {TABLE}_counts").fetchall(),
            self._patience,
        )
        found = dict(rows)
        return QueueCounts(waiting=int(found["waiting"]), in_flight=int(found["in_flight"]))

    def compact(self) -> int:
        finished = f"SELECT _id FROM {TABLE} WHERE status = {ACKED}"

        def delete() -> int:
            with immediate(self._reader) as connection:
                connection.execute(
                    f"DELETE FROM {TABLE}_cancels WHERE request_id IN (SELECT request_id FROM {TABLE}_ids"
                    f" WHERE ticket IN ({finished}))"
                )
                connection.execute(f"DELETE FROM {TABLE}_ids WHERE ticket IN ({finished})")
                connection.execute(f"DELETE FROM {TABLE}_leases WHERE ticket IN ({finished})")
                connection.execute(
                    f"DELETE FROM {TABLE}_idempotency WHERE created_at < ?",
                    (time.time() - IDEMPOTENCY_WINDOW,),
                )
                return int(connection.execute(f"DELETE FROM {TABLE} WHERE status = {ACKED}").rowcount)

        return retrying("cannot compact the job queue", delete, self._patience)

    def close(self) -> None:
        self._writer.close()
        self._claimer.close()
        self._reader.close()
