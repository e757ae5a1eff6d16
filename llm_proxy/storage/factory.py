"""The one place a back end is chosen; both entry points open theirs here."""

from __future__ import annotations

from pathlib import Path

from llm_proxy.storage.base import Backend


def open_backend(*, data_dir: Path, database_url: str | None = None, pool_size: int = 2) -> Backend:
    """The Postgres back end when ``database_url`` is given, else the embedded one in ``data_dir``
    (created if missing).

    Raises StorageUnavailable when it cannot be opened, StorageIncompatible when the installed
    libraries or the stored layout are not what the code relies on, and DatabaseUnusable for a
    malformed or unreachable ``database_url``."""
    if database_url:
        from llm_proxy.storage.postgres.backend import PostgresBackend

        return PostgresBackend(database_url, pool_size=pool_size)
    from llm_proxy.storage.sqlite.backend import EmbeddedBackend

    return EmbeddedBackend(data_dir)
