"""Start-up check of what the embedded back end relies on in persist-queue and diskcache.

The queue's SQL is written against persist-queue's table (its name, columns and status codes) and
the status store sets two private diskcache attributes. A new release could change any of them
silently; this check stops the process with a message instead.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import diskcache
import persistqueue
from persistqueue.sqlackqueue import AckStatus, SQLiteAckQueue

from llm_proxy.storage.base import StorageIncompatible
from llm_proxy.storage.sqlite import queue

PERSIST_QUEUE_VERSION = "1.1.0"
DISKCACHE_VERSION = "5.6.3"
_STATUS_CODES = {"inited": queue.INITED, "ready": queue.READY, "unack": queue.IN_FLIGHT, "acked": queue.ACKED}


def library_problems() -> list[str]:
    """What differs in the installed libraries from what the code was written against."""
    problems = []
    if persistqueue.__version__ != PERSIST_QUEUE_VERSION:
        problems.append(
            f"persist-queue is {persistqueue.__version__}, the code expects {PERSIST_QUEUE_VERSION}"
        )
    if diskcache.__version__ != DISKCACHE_VERSION:
        problems.append(f"diskcache is {diskcache.__version__}, the code expects {DISKCACHE_VERSION}")
    if f"{SQLiteAckQueue._TABLE_NAME}_{queue.QUEUE_NAME}" != queue.TABLE:
        problems.append(
            f"persist-queue names its table {SQLiteAckQueue._TABLE_NAME}_<name>, not {queue.TABLE}"
        )
    for name, code in _STATUS_CODES.items():
        if str(getattr(AckStatus, name, None)) != str(code):
            problems.append(
                f"persist-queue's AckStatus.{name} is {getattr(AckStatus, name, None)!r}, not {code}"
            )
    for attribute in ("_local", "_timeout"):
        if attribute not in diskcache.Cache.__init__.__code__.co_names:
            problems.append(f"diskcache.Cache no longer sets {attribute}")
    return problems


def table_problems(database: Path) -> list[str]:
    """What differs in an existing queue table from persist-queue's layout."""
    if not database.exists():
        return []
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        columns = tuple(row[1] for row in connection.execute(f"PRAGMA table_info({queue.TABLE})"))
    finally:
        connection.close()
    if columns and columns != queue.COLUMNS:
        return [f"the table {queue.TABLE} in {database} has columns {columns}, expected {queue.COLUMNS}"]
    return []


def check(data_dir: Path) -> None:
    """Raise StorageIncompatible naming every problem found, with what to do about it."""
    problems = library_problems()
    for sub in ("queue", "outbox"):
        problems += table_problems(data_dir / sub / "data.db")
    if problems:
        raise StorageIncompatible(
            "the embedded back end cannot run safely: "
            + "; ".join(problems)
            + ". Install the versions pinned in requirements.txt (pip install -r requirements.txt);"
            " a DATA_DIR written by another layout must be drained with the version that wrote it."
        )
