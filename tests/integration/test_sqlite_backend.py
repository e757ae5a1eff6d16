"""What only the embedded back end has: files shared by processes, one connection per process,
no eviction, and the start-up check of the libraries it relies on."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import gevent
import pytest

from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.storage.base import StorageDamaged, StorageIncompatible
from llm_proxy.storage.factory import open_backend
from llm_proxy.storage.sqlite import selfcheck
from llm_proxy.storage.sqlite.backend import EmbeddedBackend
from llm_proxy.storage.sqlite.queue import TABLE, PersistJobQueue
from llm_proxy.storage.sqlite.statuses import DiskcacheStatusStore


def job(n: int) -> Job:
    return Job(request_id=f"chatreq_{n:020d}", body={"n": n}, owner="o")


def test_counts_and_places_are_shared_across_processes(tmp_path: Path) -> None:
    producer = PersistJobQueue(tmp_path / "queue")
    consumer = PersistJobQueue(tmp_path / "queue")
    producer.put(job(0))
    producer.put(job(1))
    assert len(consumer.claim_many(1, holder="w", lease_seconds=60)) == 1
    assert producer.counts() == (1, 1)
    found = producer.find(job(1).request_id)
    assert found is not None and found.position == 1
    producer.close()
    consumer.close()


def test_one_connection_for_all_greenlets(tmp_path: Path) -> None:
    store = DiskcacheStatusStore(tmp_path / "status")
    store.put("k", StatusEntry(status=Status.PENDING, request_json="{}", owner="o", timestamp=1))
    greenlets = [gevent.spawn(lambda: store._cache._con) for _ in range(50)]
    gevent.joinall(greenlets)
    assert len({id(g.value) for g in greenlets}) == 1
    store.close()


def test_pending_entries_are_never_evicted(tmp_path: Path) -> None:
    store = DiskcacheStatusStore(tmp_path / "status")
    store._cache.reset("size_limit", 10_000)
    for i in range(100):
        store.put(
            f"r{i}",
            StatusEntry(status=Status.PENDING, request_json="[" + "1," * 500 + "1]", owner="o", timestamp=1),
        )
    assert all(store.get(f"r{i}") is not None for i in range(100))
    store.close()


def test_the_installed_libraries_are_the_ones_the_code_relies_on() -> None:
    assert selfcheck.library_problems() == []


def test_a_queue_table_in_another_layout_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "queue").mkdir(parents=True)
    with sqlite3.connect(data / "queue" / "data.db") as db:
        db.execute(f"CREATE TABLE {TABLE} (_id INTEGER PRIMARY KEY, payload BLOB, state TEXT)")
    with pytest.raises(StorageIncompatible) as refused:
        open_backend(data_dir=data)
    message = str(refused.value)
    assert TABLE in message and "payload" in message and "requirements.txt" in message


def test_another_library_version_stops_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import persistqueue

    # What `pip install persist-queue==<another>` would leave behind.
    monkeypatch.setattr(persistqueue, "__version__", "9.9.9")
    with pytest.raises(StorageIncompatible, match=r"persist-queue is 9\.9\.9"):
        open_backend(data_dir=tmp_path / "data")


# -- damaged data: refused at start, never a silent loss ------------------------------------------

JUNK = bytes(range(256)) * 128
"""32 KiB that is no SQLite page: what `dd` from the wrong file or a broken disk leaves."""


def _filled(data: Path, jobs: int = 300) -> None:
    """A DATA_DIR whose queue holds ``jobs`` waiting jobs, everything checkpointed into data.db."""
    backend = EmbeddedBackend(data)
    for n in range(jobs):
        backend.queue.put(Job(request_id=f"chatreq_{n:020d}", body={"text": "x" * 500}, owner="o"))
    backend.close()
    with contextlib.closing(sqlite3.connect(data / "queue" / "data.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_junk_over_the_queue_database_stops_the_start_naming_file_and_recovery(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _filled(data)
    (data / "queue" / "data.db").write_bytes(JUNK)
    with pytest.raises(StorageDamaged) as refused:
        open_backend(data_dir=data)
    message = str(refused.value)
    assert f"{data / 'queue' / 'data.db'} is damaged" in message
    assert "restore DATA_DIR from a backup" in message and "-wal and -shm" in message
    assert f"mv {data / 'queue'} {data / 'queue'}.damaged" in message
    assert f"delete {data / selfcheck.IDENTITY_FILE}" in message


def test_junk_inside_the_queue_database_is_found_by_the_quick_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _filled(data)
    database = data / "queue" / "data.db"
    assert database.stat().st_size > 8 * 4096
    with open(database, "r+b") as file:  # the header stays: only SQLite's own check notices
        file.seek(3 * 4096)
        file.write(JUNK[: 5 * 4096])
    assert selfcheck.integrity_problem(database) is not None
    with pytest.raises(StorageDamaged, match="is damaged"):
        open_backend(data_dir=data)


def test_junk_over_the_status_or_outbox_database_stops_the_start(tmp_path: Path) -> None:
    for name, folder in (("status/cache.db", "status"), ("outbox/data.db", "outbox")):
        data = tmp_path / folder
        open_backend(data_dir=data).close()
        (data / name).write_bytes(JUNK)
        with pytest.raises(StorageDamaged) as refused:
            open_backend(data_dir=data)
        message = str(refused.value)
        assert f"{data / name} is damaged" in message
        assert f"mv {data / folder} {data / folder}.damaged" in message
        assert selfcheck.IDENTITY_FILE not in message  # the queue is sound: nothing to forget


def test_a_sound_data_dir_passes_every_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _filled(data, jobs=3)
    assert selfcheck.damaged_folders(data) == {}
    assert selfcheck.queue_problem(data) is None
    assert selfcheck.expected_identity(data) == selfcheck.stored_identity(data / "queue" / "data.db")
    open_backend(data_dir=data).close()


@pytest.mark.parametrize("loss", ["deleted", "emptied", "replaced"])
def test_a_lost_queue_database_stops_the_start_until_the_loss_is_accepted(tmp_path: Path, loss: str) -> None:
    data = tmp_path / "data"
    _filled(data, jobs=3)
    database = data / "queue" / "data.db"
    if loss == "deleted":
        database.unlink()
    elif loss == "emptied":
        database.write_bytes(b"")
    else:
        database.unlink()
        PersistJobQueue(data / "queue").close()  # a new queue in its place, with its own identity
    with pytest.raises(StorageDamaged) as refused:
        open_backend(data_dir=data)
    message = str(refused.value)
    what = {"deleted": "is missing", "emptied": "is empty", "replaced": "is another queue"}[loss]
    assert f"{database} {what}" in message
    assert "restore" in message and f"delete {data / selfcheck.IDENTITY_FILE}" in message
    # Accepting the loss as the message says: the start goes on, with an identity of its own.
    (data / selfcheck.IDENTITY_FILE).unlink()
    backend = EmbeddedBackend(data)
    assert selfcheck.expected_identity(data) == backend.queue.identity()
    backend.close()


def test_a_queue_written_before_identities_existed_is_adopted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _filled(data, jobs=3)
    with contextlib.closing(sqlite3.connect(data / "queue" / "data.db", isolation_level=None)) as db:
        db.execute("DELETE FROM ack_queue_jobs_counts WHERE name = 'identity'")
    backend = EmbeddedBackend(data)  # a restored older backup: nothing lost
    assert backend.queue.counts().waiting == 3
    backend.close()
    (data / selfcheck.IDENTITY_FILE).unlink()  # and an older DATA_DIR altogether
    backend = EmbeddedBackend(data)
    assert selfcheck.expected_identity(data) == backend.queue.identity()
    backend.close()


def test_unfinished_statuses_the_queue_no_longer_holds_are_lost_requests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    backend = EmbeddedBackend(data)
    for n in range(4):
        backend.queue.put(job(n))
    claimed = backend.queue.claim_many(2, holder="w", lease_seconds=60)  # jobs 0 and 1
    processing = StatusEntry(status=Status.PROCESSING, request_json="{}", owner="o", timestamp=1)
    backend.statuses.put(job(0).request_id, processing)  # in flight: the queue holds it
    backend.statuses.put(job(1).request_id, processing.replace(status=Status.COMPLETED), ttl=60)
    backend.queue.ack(claimed[1])
    backend.statuses.put(job(2).request_id, processing.replace(status=Status.PENDING))
    assert backend.queue.withdraw(job(2).request_id)  # a cancel that crashed before its status
    backend.statuses.put("chatreq_from_a_lost_queue", processing)
    unfinished = {job(0).request_id, job(2).request_id, "chatreq_from_a_lost_queue"}
    assert set(backend.statuses.unfinished()) == unfinished
    assert set(backend.lost_requests()) == {job(2).request_id, "chatreq_from_a_lost_queue"}
    backend.close()
