"""Connections to the database: one small pool per process, errors turned into StorageUnavailable,
and URLs that never reach a log or a message with their password.

psycopg is cooperative under gevent when ``gevent.monkey.patch_all()`` ran before it was imported,
as the entry points do.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow
from psycopg.types.array import ListBinaryDumper

from llm_proxy.storage.base import DatabaseUnusable, StorageUnavailable

log = logging.getLogger("llm_proxy.postgres")

POOL_WAIT = 3.0
"""Longest a request waits for a connection: a submit answers 503 within 5 s when the database is
gone, never hangs."""
CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 5000
IDLE_IN_TRANSACTION_MS = 10000
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

Connection = psycopg.Connection[TupleRow]


def normalized_url(url: str) -> str:
    """Heroku's ``postgres://`` as libpq's ``postgresql://``; query parameters (sslmode...) kept."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or parts.path.strip("/")):
        raise DatabaseUnusable("DATABASE_URL must be a postgres:// or postgresql:// URL")
    return "postgresql://" + url.strip().split("://", 1)[1]


def redacted(text: str, url: str) -> str:
    """``text`` with the URL's password (and any ``password=...`` pair) blanked out."""
    password = urlsplit(url).password
    if password:
        text = text.replace(password, "***")
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text)


def _configure(connection: Connection) -> None:
    # Lists (the batched statements' arrays) go in binary: the text format escapes every quote
    # of every element in Python, about 16 ms for 50 status entries of 1 KB, during which the
    # process's event loop (its claims, its other calls) stands still.
    connection.adapters.register_dumper(list, ListBinaryDumper)


class Database:
    def __init__(self, url: str, *, pool_size: int, name: str = "llm-proxy") -> None:
        self._url = normalized_url(url)
        self._pool = psycopg_pool.ConnectionPool(
            self._url,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=POOL_WAIT,
            name=name,
            configure=_configure,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                "application_name": name,
                # Only accepting a request waits for its commit to reach the disk (see ``durable``):
                # anything else lost in a database crash is redone (a lapsed claim runs again).
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c synchronous_commit=off"
                # A client that vanished inside a transaction must not keep its locks (the claim
                # lock stops every worker's claims) until TCP notices.
                f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
                **KEEPALIVES,
            },
        )
        try:
            self._pool.open(wait=True, timeout=10)
        except (psycopg_pool.PoolTimeout, psycopg.Error) as exc:
            self._pool.close()
            raise DatabaseUnusable(
                f"cannot connect to DATABASE_URL ({urlsplit(self._url).hostname}): "
                + redacted(str(exc) or type(exc).__name__, self._url)
            ) from None

    @property
    def url(self) -> str:
        return self._url

    @contextlib.contextmanager
    def connection(self, what: str) -> Iterator[Connection]:
        """A pooled connection in autocommit mode; any database failure becomes StorageUnavailable."""
        try:
            with self._pool.connection(timeout=POOL_WAIT) as connection:
                yield connection
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise StorageUnavailable(
                f"{what}: {redacted(str(exc) or type(exc).__name__, self._url)}"
            ) from exc

    @contextlib.contextmanager
    def transaction(self, what: str) -> Iterator[Connection]:
        with self.connection(what) as connection, connection.transaction():
            yield connection

    @contextlib.contextmanager
    def durable(self, what: str) -> Iterator[Connection]:
        """A transaction whose commit waits until it is on disk (and on synchronous standbys)."""
        with self.transaction(what) as connection:
            connection.execute("SET LOCAL synchronous_commit = on")
            yield connection

    @contextlib.contextmanager
    def alone(self, what: str, key: int) -> Iterator[Connection | None]:
        """A transaction that only one process at a time gets (None for the others): clean-ups
        run by every worker need not all scan the same rows."""
        with self.transaction(what) as connection:
            row = connection.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
            yield connection if row is not None and row[0] else None

    def execute(self, what: str, sql: str, args: Any = None) -> list[TupleRow]:
        with self.connection(what) as connection:
            cursor = connection.execute(sql, args)
            return cursor.fetchall() if cursor.description else []

    def direct(self) -> Connection:
        """A connection of its own, outside the pool (for LISTEN)."""
        return psycopg.connect(
            f"{self._url}{'&' if '?' in self._url else '?'}"
            + "&".join(f"{name}={value}" for name, value in KEEPALIVES.items()),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
        )

    def close(self) -> None:
        self._pool.close()
