"""The networked webhook outbox: owed deliveries taken by any worker's sender for a while, which the
sender extends while it works on them; what a sender that died had taken is owed again once that
while is over."""

from __future__ import annotations

import secrets

from llm_proxy.storage.base import Delivery, Outbox, OwedDelivery
from llm_proxy.storage.postgres.database import Connection, Database

COMPACT_LOCK = 7_210_005


class PostgresOutbox(Outbox):
    def __init__(self, database: Database) -> None:
        self._db = database
        # Who this sender is, to the other senders: only the taker of a delivery may keep it.
        self._holder = secrets.token_hex(8)

    def owe(self, delivery: Delivery) -> None:
        with self._db.transaction("cannot owe a webhook") as connection:
            self.owe_in(connection, delivery)

    @staticmethod
    def owe_in(connection: Connection, delivery: Delivery) -> None:
        connection.execute(
            "INSERT INTO llm_proxy_outbox (request_id, owner, url, payload) VALUES (%s, %s, %s, %s)",
            (delivery.request_id, delivery.owner, delivery.url, delivery.payload),
        )

    def take(self, limit: int, *, hold: float) -> list[OwedDelivery]:
        rows = self._db.execute(
            "cannot take webhook deliveries",
            "WITH picked AS MATERIALIZED (SELECT id FROM llm_proxy_outbox"
            " WHERE state = 0 OR (state = 1 AND taken_until < now())"
            " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
            " UPDATE llm_proxy_outbox AS o SET state = 1, taken_by = %s,"
            " taken_until = now() + make_interval(secs => %s)"
            " FROM picked WHERE o.id = picked.id RETURNING o.id, o.request_id, o.owner, o.url, o.payload",
            (limit, self._holder, hold),
        )
        owed = [
            OwedDelivery(int(id_), Delivery(request_id=rid, owner=owner, url=url, payload=payload))
            for id_, rid, owner, url, payload in rows
        ]
        return sorted(owed, key=lambda o: o.ticket)

    def keep(self, owed: list[OwedDelivery], *, hold: float) -> set[int]:
        if not owed:
            return set()
        rows = self._db.execute(
            "cannot keep webhook deliveries",
            "UPDATE llm_proxy_outbox SET taken_until = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s) AND state = 1 AND taken_by = %s RETURNING id",
            (hold, [o.ticket for o in owed], self._holder),
        )
        return {int(id_) for (id_,) in rows}

    def done(self, owed: OwedDelivery) -> None:
        self._db.execute(
            "cannot finish a webhook delivery",
            "UPDATE llm_proxy_outbox SET state = 2 WHERE id = %s",
            (owed.ticket,),
        )

    def recover(self) -> int:
        """Nothing to do at a sender's start: other senders may be alive, and what a dead one took
        is owed again when its hold is over."""
        return 0

    def compact(self) -> int:
        with self._db.alone("cannot compact the outbox", COMPACT_LOCK) as connection:
            if connection is None:
                return 0
            return int(connection.execute("DELETE FROM llm_proxy_outbox WHERE state = 2").rowcount)

    def close(self) -> None:
        """The database is closed by the back end that opened it."""
