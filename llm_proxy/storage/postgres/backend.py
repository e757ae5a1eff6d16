"""The networked back end: one PostgreSQL database for any number of web and worker processes."""

from __future__ import annotations

import psycopg

from llm_proxy.domain.status import StatusEntry
from llm_proxy.storage.base import (
    Backend,
    Claim,
    ConcurrencyLimit,
    Delivery,
    WebSignals,
    WorkerSignals,
)
from llm_proxy.storage.postgres.database import Database
from llm_proxy.storage.postgres.limit import SharedLimit
from llm_proxy.storage.postgres.outbox import PostgresOutbox
from llm_proxy.storage.postgres.queue import PostgresJobQueue
from llm_proxy.storage.postgres.schema import migrate
from llm_proxy.storage.postgres.signals import PostgresWebSignals, PostgresWorkerSignals
from llm_proxy.storage.postgres.statuses import PostgresStatusStore


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
        self._signals: list[WebSignals | WorkerSignals] = []

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
    ) -> bool:
        # One transaction: the ack (fenced by the lease token), the status and the owed webhook.
        with self._db.transaction("cannot finish the request") as connection:
            if claim is not None and not self.queue.ack_in(connection, claim):
                raise psycopg.Rollback
            self.statuses.put_in(connection, request_id, entry, ttl)
            if delivery is not None:
                self.outbox.owe_in(connection, delivery)
            return True
        return False

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

    def describe_key_store(self) -> str:
        return "the database (DATABASE_URL)"

    def consumer_admitted(self) -> bool:
        return True

    @property
    def previous_holders_gone(self) -> bool:
        # Other workers may be alive: only lapsed leases are taken over.
        return False

    def close(self) -> None:
        for signals in self._signals:
            signals.close()
        self._db.close()
