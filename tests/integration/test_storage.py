"""The storage seam's contract. A new back end subclasses these classes with its own fixture."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from sqlite_storage import DiskcacheStatusStore, PersistJobQueue
from storage import IdempotencyConflict, Job, JobQueue, StatusStore


def place(queue: JobQueue, n: int) -> int | None:
    found = queue.find(job(n).request_id)
    return found.position if found else None


def job(n: int) -> Job:
    return Job(request_id=f"chatreq_{n:020d}", body={"model": "m", "n": n}, owner="o")


class JobQueueContract:
    @pytest.fixture
    def queue(self) -> Iterator[JobQueue]:
        raise NotImplementedError

    def test_fifo_claim_and_ack(self, queue: JobQueue) -> None:
        tickets = [queue.put(job(i)) for i in range(3)]
        assert queue.waiting() == 3 and queue.in_flight() == 0
        first = queue.claim()
        assert first is not None and first.job == job(0) and first.ticket == tickets[0]
        assert queue.waiting() == 2 and queue.in_flight() == 1
        queue.ack(first.ticket)
        assert queue.in_flight() == 0
        second = queue.claim()
        assert second is not None and second.job == job(1)

    def test_find_by_request_id_until_finished(self, queue: JobQueue) -> None:
        tickets = [queue.put(job(i)) for i in range(2)]
        found = queue.find(job(1).request_id)
        assert found is not None and found.ticket == tickets[1] and found.owner == job(1).owner
        claim = queue.claim()
        assert claim is not None
        assert queue.find(job(0).request_id) is not None  # in flight: still found
        queue.ack(claim.ticket)
        assert queue.find(job(0).request_id) is None
        queue.compact()
        assert queue.find(job(0).request_id) is None and queue.find("chatreq_unknown") is None

    def test_concurrent_puts_all_land_in_order(self, queue: JobQueue) -> None:
        greenlets = [gevent.spawn(queue.put, job(i)) for i in range(50)]
        gevent.joinall(greenlets, raise_error=True)
        tickets = [g.value for g in greenlets]
        assert len(set(tickets)) == 50 and queue.waiting() == 50
        claimed = [queue.claim() for _ in range(50)]
        assert [c.job.request_id for c in claimed if c] == [job(i).request_id for i in range(50)]

    def test_claim_on_empty_returns_none_at_once(self, queue: JobQueue) -> None:
        started = time.monotonic()
        assert queue.claim() is None
        assert time.monotonic() - started < 1.0

    def test_positions_are_one_based_among_waiting(self, queue: JobQueue) -> None:
        for i in range(4):
            queue.put(job(i))
        assert [place(queue, i) for i in range(4)] == [1, 2, 3, 4]
        claim = queue.claim()
        assert claim is not None
        in_flight = queue.find(claim.job.request_id)
        assert in_flight is not None and in_flight.in_flight and in_flight.position is None
        assert [place(queue, i) for i in range(1, 4)] == [1, 2, 3]

    def test_find_reports_the_job_without_decoding_it(self, queue: JobQueue) -> None:
        sent = Job(
            request_id="chatreq_found0000000000000",
            owner="o",
            submitted_at=1234,
            body={"messages": [{"content": "é🙂\ud800"}], "n": 1},
        )
        ticket = queue.put(sent)
        found = queue.find(sent.request_id)
        assert found is not None
        assert (found.ticket, found.owner, found.submitted_at) == (ticket, "o", 1234)
        assert json.loads(found.body_json) == sent.body
        assert found.fresh and not found.in_flight and found.position == 1

    def test_positions_and_counts_stay_exact_through_every_transition(self, queue: JobQueue) -> None:
        tickets = [queue.put(job(i)) for i in range(12)]
        claims = [queue.claim() for _ in range(4)]
        assert all(c is not None for c in claims)
        queue.ack(claims[0].ticket)  # type: ignore[union-attr]
        queue.release(claims[2].ticket)  # type: ignore[union-attr]
        waiting = [tickets[2], *tickets[4:]]
        assert queue.waiting() == len(waiting) and queue.in_flight() == 2
        # Near either end of the line, the place is the same as counting by hand.
        waiting_ids = [2, *range(4, 12)]
        assert [place(queue, i) for i in waiting_ids] == list(range(1, len(waiting) + 1))
        assert place(queue, 1) is None and queue.find(job(0).request_id) is None
        released = queue.find(job(2).request_id)
        assert released is not None and not released.fresh
        assert queue.recover() == 2
        assert queue.waiting() == len(waiting) + 2 and queue.in_flight() == 0
        queue.compact()
        assert queue.waiting() == len(waiting) + 2

    def test_release_puts_a_job_back_at_its_place(self, queue: JobQueue) -> None:
        for i in range(3):
            queue.put(job(i))
        claim = queue.claim()
        assert claim is not None
        queue.release(claim.ticket)
        again = queue.claim()
        assert again is not None and again.job == job(0)

    def test_recover_makes_orphaned_claims_wait_again(self, queue: JobQueue) -> None:
        queue.put(job(0))
        queue.put(job(1))
        assert queue.claim() is not None
        assert queue.recover() == 1
        assert queue.waiting() == 2 and queue.in_flight() == 0

    def test_compact_drops_only_acked_jobs(self, queue: JobQueue) -> None:
        for i in range(5):
            queue.put(job(i))
        for _ in range(3):
            claim = queue.claim()
            assert claim is not None
            queue.ack(claim.ticket)
        assert queue.compact() == 3
        assert queue.waiting() == 2
        assert queue.compact() == 0

    def test_unicode_and_odd_values_round_trip(self, queue: JobQueue) -> None:
        odd = Job(
            request_id="chatreq_odd0000000000000",
            owner="o",
            body={"messages": [{"content": "é漢字🙂\u0000\ud800"}], "big": 10**30, "f": 1e-300},
        )
        queue.put(odd)
        claim = queue.claim()
        assert claim is not None and claim.job == odd


class TestPersistJobQueue(JobQueueContract):
    @pytest.fixture
    def queue(self, tmp_path: Path) -> Iterator[JobQueue]:
        q = PersistJobQueue(tmp_path / "queue")
        yield q
        q.close()

    def test_counts_are_shared_across_processes(self, tmp_path: Path) -> None:
        producer = PersistJobQueue(tmp_path / "queue")
        consumer = PersistJobQueue(tmp_path / "queue")
        producer.put(job(0))
        producer.put(job(1))
        claim = consumer.claim()
        assert claim is not None
        assert producer.waiting() == 1 and producer.in_flight() == 1
        assert place(producer, 0) is None and place(producer, 1) == 1
        producer.close()
        consumer.close()


class StatusStoreContract:
    @pytest.fixture
    def store(self) -> Iterator[StatusStore]:
        raise NotImplementedError

    def test_put_replaces_and_get_misses(self, store: StatusStore) -> None:
        store.put("a", {"status": "processing"})
        store.put("a", {"status": "completed"}, ttl=60)
        assert store.get("a") == {"status": "completed"}
        assert store.get("missing") is None

    def test_ttl_expires_entries_and_none_keeps_them(self, store: StatusStore) -> None:
        store.put("keep", {"status": "pending"})
        store.put("short", {"status": "completed"}, ttl=0.2)
        assert store.get("short") == {"status": "completed"}
        time.sleep(0.4)
        assert store.get("short") is None
        assert store.purge_expired() >= 0
        assert store.get("keep") == {"status": "pending"}


class TestDiskcacheStatusStore(StatusStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[StatusStore]:
        s = DiskcacheStatusStore(tmp_path / "status")
        yield s
        s.close()

    def test_one_connection_for_all_greenlets(self, tmp_path: Path) -> None:
        store = DiskcacheStatusStore(tmp_path / "status")
        store.put("k", {"v": 1})

        def read() -> object:
            return store._cache._con

        greenlets = [gevent.spawn(read) for _ in range(50)]
        gevent.joinall(greenlets)
        assert len({id(g.value) for g in greenlets}) == 1
        store.close()

    def test_pending_entries_are_never_evicted(self, tmp_path: Path) -> None:
        store = DiskcacheStatusStore(tmp_path / "status")
        store._cache.reset("size_limit", 10_000)
        for i in range(100):
            store.put(f"r{i}", {"status": "pending", "request": "x" * 1000})
        assert all(store.get(f"r{i}") is not None for i in range(100))
        store.close()


class TestIdempotency:
    @pytest.fixture
    def queue(self, tmp_path: Path) -> Iterator[PersistJobQueue]:
        q = PersistJobQueue(tmp_path / "queue")
        yield q
        q.close()

    def test_same_key_and_body_stand_for_the_first_request(self, queue: PersistJobQueue) -> None:
        first = Job(request_id="chatreq_first000000000000", body={"a": 1, "b": [1, 2]}, owner="o")
        again = Job(request_id="chatreq_again000000000000", body={"b": [1, 2], "a": 1}, owner="o")
        assert queue.put_once(first, "k1") == first.request_id
        assert queue.put_once(again, "k1") == first.request_id  # key order aside, the same JSON
        assert queue.waiting() == 1
        other_owner = Job(request_id="chatreq_other000000000000", body={"a": 1, "b": [1, 2]}, owner="p")
        assert queue.put_once(other_owner, "k1") == other_owner.request_id

    def test_same_key_with_another_body_conflicts(self, queue: PersistJobQueue) -> None:
        queue.put_once(job(0), "k")
        with pytest.raises(IdempotencyConflict) as conflict:
            queue.put_once(job(1), "k")
        assert conflict.value.request_id == job(0).request_id
        assert queue.waiting() == 1

    def test_racing_submits_with_one_key_queue_once(self, queue: PersistJobQueue) -> None:
        copies = [Job(request_id=f"chatreq_race{i:016d}", body={"same": True}, owner="o") for i in range(20)]
        greenlets = [gevent.spawn(queue.put_once, j, "race") for j in copies]
        gevent.joinall(greenlets, raise_error=True)
        assert {g.value for g in greenlets} == {copies[0].request_id}
        assert queue.waiting() == 1
