"""What only the embedded back end has: files shared by processes, one connection per process,
no eviction, and the start-up check of the libraries it relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import gevent
import pytest

from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.storage.base import StorageIncompatible
from llm_proxy.storage.factory import open_backend
from llm_proxy.storage.sqlite import selfcheck
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
