"""What only the Postgres back end has: its schema set-up, its URLs, clean-ups run by one process at
a time, and the ceiling counted across processes in the claiming transaction."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import psycopg
import pytest

from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.ratelimit.book import RatePolicy
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import Backend, Claim, DatabaseUnusable, Delivery
from llm_proxy.storage.factory import open_backend
from llm_proxy.storage.postgres.database import Database, normalized_url, redacted
from llm_proxy.storage.postgres.schema import MIGRATIONS, migrate
from llm_proxy.storage.postgres.statuses import PURGE_LOCK
from llm_proxy.upstream.outcome import Outcome
from llm_proxy.worker.pacing import Limiter, Permit
from llm_proxy.worker.retry import RetryPolicy
from llm_proxy.worker.runner import GracefulStop, JobRunner


def test_urls_are_normalised_and_passwords_never_shown() -> None:
    assert (
        normalized_url("postgres://u:p@h:5432/d?sslmode=require")
        == "postgresql://u:p@h:5432/d?sslmode=require"
    )
    with pytest.raises(DatabaseUnusable):
        normalized_url("mysql://u:p@h/d")
    text = "connection to postgresql://u:s3cret@h/d failed; password=s3cret"
    assert "s3cret" not in redacted(text, "postgresql://u:s3cret@h/d")


def test_migrations_run_once_however_many_processes_start_together(database_url: str) -> None:
    databases = [Database(database_url, pool_size=1) for _ in range(4)]
    try:
        greenlets = [gevent.spawn(migrate, db) for db in databases]
        gevent.joinall(greenlets, raise_error=True)
        assert {g.value for g in greenlets} == {len(MIGRATIONS)}
        assert migrate(databases[0]) == len(MIGRATIONS)
    finally:
        for db in databases:
            db.close()


def test_expired_results_are_purged_by_one_process_at_a_time(database_url: str, tmp_path: Path) -> None:
    backend = open_backend(data_dir=tmp_path, database_url=database_url)
    try:
        entry = StatusEntry(status=Status.COMPLETED, request_json="{}", owner="o", timestamp=1)
        backend.statuses.put("old", entry, ttl=0.01)
        time.sleep(0.1)
        with psycopg.connect(database_url, autocommit=True) as other:
            other.execute("SELECT pg_advisory_lock(%s)", (PURGE_LOCK,))
            assert backend.statuses.purge_expired() == 0  # another process is purging
            other.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
        assert backend.statuses.purge_expired() == 1
    finally:
        backend.close()


def test_claims_from_several_processes_share_one_ceiling(database_url: str, tmp_path: Path) -> None:
    workers = [open_backend(data_dir=tmp_path / str(i), database_url=database_url) for i in range(4)]
    try:
        for worker in workers:
            worker.concurrency_limit(3)
        for i in range(20):
            workers[0].queue.put(Job(request_id=f"chatreq_{i:020d}", body={}, owner="o"))
        greenlets = [
            gevent.spawn(w.queue.claim_many, 3, holder=f"w{n}", lease_seconds=60)
            for n, w in enumerate(workers)
        ]
        gevent.joinall(greenlets, raise_error=True)
        # However the claims interleave, three calls at most run at once across all workers.
        assert sum(len(g.value) for g in greenlets) == 3
    finally:
        for worker in workers:
            worker.close()


def test_a_claim_stores_its_jobs_first_attempt_in_its_own_commit(database_url: str, tmp_path: Path) -> None:
    """The worker writes nothing before a fresh job's first call: the claim stored its status.
    A job with a cancel recorded gets none (its worker cancels it without calling)."""
    backend = open_backend(data_dir=tmp_path, database_url=database_url)
    try:
        for i in range(3):
            backend.queue.put(Job(request_id=f"chatreq_{i:020d}", body={"n": i}, owner="o"))
        [cancelled] = backend.queue.claim_many(1, holder="w", lease_seconds=60)
        backend.queue.cancel(cancelled.job.request_id)
        backend.queue.requeue_lapsed(float("inf"))

        def opening(job: Job, started_at: int) -> StatusEntry:
            return StatusEntry(
                status=Status.PROCESSING, request_json=job.body_json, owner="o", timestamp=started_at
            )

        claims = backend.queue.claim_many(3, holder="w", lease_seconds=60, opening=opening)
        assert [(c.cancel_requested, c.opened_at is not None) for c in claims] == [
            (True, False),
            (False, True),
            (False, True),
        ]
        for taken in claims[1:]:
            assert taken.opened_at is not None
            assert backend.statuses.get(taken.job.request_id) == opening(taken.job, taken.opened_at)
        assert backend.statuses.get(cancelled.job.request_id) is None
    finally:
        backend.close()


class _StoppedBeforeTheCall(Limiter):
    """Shutdown's deadline striking while a job waits for its rate-limit permit."""

    def before_call(self, job: Job) -> Permit | float:
        raise GracefulStop


class _NoUpstream:
    def complete(self, body: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> Outcome:
        raise AssertionError("no call was expected")

    def stream(
        self, body: dict[str, Any], on_event: Callable[[bytes], None], endpoint: Endpoint = Endpoint.CHAT
    ) -> Outcome:
        raise AssertionError("no call was expected")


def _opened_claim(backend: Backend, limiter: Limiter | None = None) -> tuple[JobRunner, Claim]:
    """A runner that must not call, and one job claimed with its first attempt stored."""
    backend.queue.put(Job(request_id="chatreq_00000000000000000000", body={"model": "m"}, owner="o"))
    runner = JobRunner(
        queue=backend.queue,
        statuses=backend.statuses,
        upstream=_NoUpstream(),
        finalizer=Finalizer(backend=backend, result_ttl=60, announce=lambda request_id: None),
        policy=RetryPolicy(max_retries=1, base_delay=0.1, max_delay=1),
        stopping=gevent.event.Event(),
        limiter=limiter,
    )
    [claim] = backend.queue.claim_many(1, holder="w", lease_seconds=60, opening=runner.opening)
    opened = backend.statuses.get(claim.job.request_id)
    assert claim.opened_at is not None and opened is not None and opened.attempts == 1
    return runner, claim


def test_a_job_stopped_before_the_call_its_claim_opened_waits_again_without_that_attempt(
    database_url: str, tmp_path: Path
) -> None:
    backend = open_backend(data_dir=tmp_path, database_url=database_url)
    try:
        runner, claim = _opened_claim(backend, _StoppedBeforeTheCall(RatePolicy(), backend.queue))
        runner.run(claim, backend.concurrency_limit(1).hold(claim))
        entry = backend.statuses.get(claim.job.request_id)
        assert entry is not None and entry.status is Status.PENDING
        assert (entry.attempts, entry.history) == (0, ())
        assert backend.queue.counts() == (1, 0)
    finally:
        backend.close()


def test_a_job_cancelled_before_the_call_its_claim_opened_ends_with_no_attempt(
    database_url: str, tmp_path: Path
) -> None:
    backend = open_backend(data_dir=tmp_path, database_url=database_url)
    try:
        runner, claim = _opened_claim(backend)
        # The cancel arrives (by notification) after the claim, before the greenlet calls.
        assert not runner.cancel(claim.job.request_id)
        runner.run(claim, backend.concurrency_limit(1).hold(claim))
        entry = backend.statuses.get(claim.job.request_id)
        assert entry is not None and entry.status is Status.CANCELLED
        assert (entry.attempts_made, entry.history) == (0, ())
    finally:
        backend.close()


def test_a_slot_given_back_is_free_for_the_next_claim_before_its_job_finishes(
    database_url: str, tmp_path: Path
) -> None:
    worker, other = (open_backend(data_dir=tmp_path / n, database_url=database_url) for n in "ab")
    try:
        limit = worker.concurrency_limit(1)
        other.concurrency_limit(1)
        for i in range(4):
            worker.queue.put(Job(request_id=f"chatreq_{i:020d}", body={}, owner="o"))
        [first] = worker.queue.claim_many(1, holder="w", lease_seconds=60)
        slot = limit.hold(first)
        assert worker.queue.claim_many(1, holder="w", lease_seconds=60) == []
        # Its call is over; its final status is not stored yet. The ceiling counts calls.
        slot.release()
        [second] = worker.queue.claim_many(1, holder="w", lease_seconds=60)
        assert second.job.request_id == "chatreq_00000000000000000001"
        # Across processes too: the other worker sees the one slot taken by the second call.
        assert other.queue.claim_many(1, holder="o", lease_seconds=60) == []
        assert worker.queue.ack(first) and worker.queue.ack(second)
        [third] = other.queue.claim_many(1, holder="o", lease_seconds=60)
        # A stale lease frees nothing: its job belongs to another holder now.
        other.queue.requeue_lapsed(float("inf"))
        [again] = worker.queue.claim_many(1, holder="w", lease_seconds=60)
        assert again.job == third.job
        limit.hold(third).release()
        assert worker.queue.claim_many(1, holder="w", lease_seconds=60) == []
        limit.hold(again).release()
        [fourth] = worker.queue.claim_many(1, holder="w", lease_seconds=60)
        assert fourth.job.request_id == "chatreq_00000000000000000003"
    finally:
        worker.close()
        other.close()


def test_a_sender_cut_off_past_its_hold_loses_the_delivery_to_the_one_that_took_it_up(
    database_url: str, tmp_path: Path
) -> None:
    first, second = (open_backend(data_dir=tmp_path / n, database_url=database_url) for n in "ab")
    try:
        first.outbox.owe(
            Delivery(request_id="chatreq_hook", owner="o", url="https://example.com/h", payload="{}")
        )
        [mine] = first.outbox.take(10, hold=0.3)
        assert first.outbox.keep([mine], hold=0.3) == {mine.ticket}
        time.sleep(0.5)  # cut off: no keep within the hold
        [theirs] = second.outbox.take(10, hold=60)
        assert theirs.ticket == mine.ticket
        # The first sender learns it lost the delivery; it cannot keep the second one's hold alive.
        assert first.outbox.keep([mine], hold=60) == set()
        assert second.outbox.keep([theirs], hold=60) == {theirs.ticket}
    finally:
        first.close()
        second.close()
