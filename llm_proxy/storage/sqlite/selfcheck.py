"""Start-up check of what the embedded back end relies on in persist-queue and diskcache.

The queue's SQL is written against persist-queue's table (its name, columns and status codes) and
the status store sets two private diskcache attributes. A new release could change any of them
silently; this check stops the process with a message instead.

It also refuses a DATA_DIR whose data is damaged, where starting anyway would lose requests without
a word: a database file that fails SQLite's ``quick_check`` (junk written over it, a torn copy), or a
queue database deleted, emptied or swapped for another while ``queue.identity`` shows this DATA_DIR
had one. Each message names the file and how to recover.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import diskcache
import persistqueue
from persistqueue.sqlackqueue import AckStatus, SQLiteAckQueue

from llm_proxy.storage.base import StorageDamaged, StorageIncompatible, StorageUnavailable
from llm_proxy.storage.sqlite import queue
from llm_proxy.storage.sqlite.transactions import OPEN_TIMEOUT

PERSIST_QUEUE_VERSION = "1.1.0"
DISKCACHE_VERSION = "5.6.3"
_STATUS_CODES = {"inited": queue.INITED, "ready": queue.READY, "unack": queue.IN_FLIGHT, "acked": queue.ACKED}
DATABASES = ("queue/data.db", "outbox/data.db", "status/cache.db")
"""Every SQLite file of the embedded back end, relative to DATA_DIR."""
IDENTITY_FILE = "queue.identity"
"""Outside ``queue/``, so that it outlives the queue database it names (see ``queue_problem``)."""
# SQLite's primary result codes for "this is not a sound database file"; any other error (locked,
# cannot open, I/O) says nothing about the data and must not be reported as damage.
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


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
    try:
        connection = _read_only(database)
        try:
            columns = tuple(row[1] for row in connection.execute(f"PRAGMA table_info({queue.TABLE})"))
        finally:
            connection.close()
    except sqlite3.Error as exc:
        # Damage was ruled out first; what is left is a file that cannot be read now.
        raise StorageUnavailable(f"cannot read {database}: {exc}") from exc
    if columns and columns != queue.COLUMNS:
        return [f"the table {queue.TABLE} in {database} has columns {columns}, expected {queue.COLUMNS}"]
    return []


def _read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=OPEN_TIMEOUT)


def _damage(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _DAMAGE_CODES


def integrity_problem(database: Path) -> str | None:
    """What SQLite's ``quick_check`` finds wrong with an existing database file; None when sound.

    ``quick_check`` reads every page once (about a second per GB) but skips the index-to-table
    cross-checks of ``integrity_check``, which cost far more on a large queue. Raises
    StorageUnavailable when the file cannot be read for another reason (locked, permissions)."""
    if not database.exists():
        return None
    try:
        connection = _read_only(database)
        try:
            rows = connection.execute("PRAGMA quick_check(5)").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        if _damage(exc):
            return f"{database} is damaged ({exc})"
        raise StorageUnavailable(f"cannot read {database}: {exc}") from exc
    if rows != [("ok",)]:
        return f"{database} is damaged (SQLite's quick_check: {'; '.join(str(row[0]) for row in rows)})"
    return None


def damaged_folders(data_dir: Path) -> dict[str, str]:
    """Each folder of DATA_DIR whose database is damaged, with what is wrong with it."""
    found = {}
    for name in DATABASES:
        problem = integrity_problem(data_dir / name)
        if problem:
            found[name.split("/")[0]] = problem
    return found


def stored_identity(database: Path) -> int | None:
    """The identity a queue database was created with; None for one without (no such file, an
    empty one, or one written before identities existed)."""
    if not database.exists():
        return None
    connection = _read_only(database)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if f"{queue.TABLE}_counts" not in tables:
            return None
        row = connection.execute(f"SELECT n FROM {queue.TABLE}_counts WHERE name = 'identity'").fetchone()
    finally:
        connection.close()
    return None if row is None else int(row[0])


def _has_queue_table(database: Path) -> bool:
    connection = _read_only(database)
    try:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return connection.execute(query, (queue.TABLE,)).fetchone() is not None
    finally:
        connection.close()


def expected_identity(data_dir: Path) -> int | None:
    """The queue identity this DATA_DIR recorded; None before it recorded one."""
    try:
        text = (data_dir / IDENTITY_FILE).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageUnavailable(f"cannot read {data_dir / IDENTITY_FILE}: {exc}") from exc
    # A record torn by a crash while written says nothing; the next open writes it again.
    return int(text) if text.lstrip("-").isdigit() else None


def record_identity(data_dir: Path, identity: int) -> None:
    """Record which queue database this DATA_DIR holds, unless one is recorded. Web and worker may
    both do it at the same moment: each writes the same value, and the rename makes either whole."""
    if expected_identity(data_dir) is not None:
        return
    temporary = data_dir / f"{IDENTITY_FILE}.{os.getpid()}"
    temporary.write_text(f"{identity}\n", encoding="ascii")
    os.replace(temporary, data_dir / IDENTITY_FILE)


def queue_problem(data_dir: Path) -> str | None:
    """Whether the queue database is gone, emptied or another one although DATA_DIR recorded one:
    opening it would start a new, empty queue, and the requests that waited in the lost one would
    answer 404 without a word."""
    expected = expected_identity(data_dir)
    if expected is None:
        return None
    database = data_dir / "queue" / "data.db"
    try:
        found = stored_identity(database)
        if found == expected:
            return None
        if not database.exists():
            what = "is missing"
        elif found is not None:
            what = "is another queue than the one this DATA_DIR had"
        elif _has_queue_table(database):
            # Written before identities existed: a restored older backup of it, nothing lost.
            return None
        else:
            what = "is empty"
    except sqlite3.Error as exc:
        if _damage(exc):
            return f"{database} is damaged ({exc})"
        raise StorageUnavailable(f"cannot read {database}: {exc}") from exc
    return (
        f"{database} {what}, although {data_dir / IDENTITY_FILE} shows this DATA_DIR had a queue:"
        " the requests that waited in it are lost unless it is restored. Stop every web and worker"
        f" process on this DATA_DIR, then restore {data_dir / 'queue'} from a backup (data.db with"
        " its data.db-wal and data.db-shm files); or, to accept the loss and start with an empty"
        f" queue, move {data_dir / 'queue'} aside (with any -wal and -shm file left in it) and"
        f" delete {data_dir / IDENTITY_FILE}: requests that had started then end as error"
        ' "lost", those that had not are unknown (404)'
    )


_HELD = {
    "queue": 'its waiting requests (those already started end as error "lost")',
    "status": "the statuses and results it kept",
    "outbox": "the webhooks it still owed",
}


def _recovery(data_dir: Path, folders: list[str]) -> str:
    moves = " and ".join(f"mv {data_dir / f} {data_dir / f}.damaged" for f in folders)
    forget = f", delete {data_dir / IDENTITY_FILE}" if "queue" in folders else ""
    lost = "; ".join(f"{f}/: {_HELD[f]}" for f in folders)
    return (
        "Stop every web and worker process on this DATA_DIR, then restore DATA_DIR from a backup"
        " (the whole folder: each database with its -wal and -shm files), or start without the"
        f" damaged data ({moves}{forget}, then start again), losing what it held ({lost})."
    )


def check(data_dir: Path) -> None:
    """Raise StorageDamaged when the data is damaged or the queue database was lost, and
    StorageIncompatible naming every layout or library problem; each says what to do about it."""
    damaged = damaged_folders(data_dir)
    if damaged:
        raise StorageDamaged(
            "the embedded back end refuses to start on damaged data: "
            + "; ".join(damaged.values())
            + ". "
            + _recovery(data_dir, list(damaged))
        )
    lost = queue_problem(data_dir)
    if lost:
        raise StorageDamaged(f"the embedded back end refuses to start: {lost}.")
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
