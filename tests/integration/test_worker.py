"""The worker loop in-process, on real storage, with a scripted upstream collaborator."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from conftest import body, wait_until
from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import CancelResult, Claim, Renewal, StorageUnavailable
from llm_proxy.storage.factory import open_backend
from llm_proxy.upstream.outcome import Outcome
from llm_proxy.worker.dispatcher import Dispatcher, DispatchSettings
from llm_proxy.worker.retry import RetryPolicy
from llm_proxy.worker.runner import JobRunner, entry_for
from support.web import claim_one

OK = Outcome(response_json='{"object": "chat.completion", "choices": []}')


def fail(retryable: bool = True, retry_after: float | None = None) -> Outcome:
    return Outcome(
        error={"message": "boom", "type": "upstream_error"}, retryable=retryable, retry_after=retry_after
    )


class ScriptedUpstream:
    """Answers each request id with its scripted outcomes in turn; holds calls while ``gate`` is shut."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Outcome]] = {}
        self.calls: list[str] = []
        self.inflight = 0
        self.peak = 0
        self.gate = gevent.event.Event()
        self.gate.set()

    def complete(self, request: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> Outcome:
        rid = request["messages"][0]["content"]
        self.calls.append(rid)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            self.gate.wait()
            gevent.sleep(0.01)
            script = self.scripts.get(rid) or [OK]
            return script.pop(0) if len(script) > 1 else script[0]
        finally:
            self.inflight -= 1

    def stream(
        self, request: dict[str, Any], on_event: Callable[[bytes], None], endpoint: Endpoint = Endpoint.CHAT
    ) -> Outcome:
        outcome = self.complete(request)
        if outcome.ok:
            on_event(b"data: {}\n\n")
        return outcome


class Rig:
    """A worker as ``llm_proxy.worker.process`` wires it, on the embedded back end, with a
    scripted upstream and recorded backoff sleeps."""

    def __init__(
        self,
        tmp_path: Path,
        poll_interval: float = 1.0,
        max_concurrent: int = 2,
        max_retries: int = 3,
        result_ttl: float = 60,
        shutdown_timeout: float = 1,
        lease_seconds: float = 60,
        signals: bool = False,
    ) -> None:
        self.backend = open_backend(data_dir=tmp_path / "data")
        assert self.backend.consumer_admitted()
        self.queue = self.backend.queue
        self.statuses = self.backend.statuses
        self.upstream = ScriptedUpstream()
        self.sleeps: list[float] = []
        self.sleep: Callable[[float], Any] = self.sleeps.append
        self.stopping = gevent.event.Event()
        worker_signals = self.backend.worker_signals() if signals else None
        self.finalizer = Finalizer(
            backend=self.backend, result_ttl=result_ttl, announce=lambda request_id: None
        )
        self.runner = JobRunner(
            queue=self.queue,
            statuses=self.statuses,
            upstream=self.upstream,
            finalizer=self.finalizer,
            policy=RetryPolicy(max_retries=max_retries, base_delay=0.5, max_delay=8),
            stopping=self.stopping,
            sleep=lambda seconds: self.sleep(seconds),
        )
        self.worker = Dispatcher(
            queue=self.queue,
            statuses=self.statuses,
            limit=self.backend.concurrency_limit(max_concurrent),
            runner=self.runner,
            settings=DispatchSettings(
                shutdown_timeout=shutdown_timeout, poll_interval=poll_interval, lease_seconds=lease_seconds
            ),
            stopping=self.stopping,
            signals=worker_signals,
            previous_holders_gone=self.backend.previous_holders_gone,
        )
        self.greenlet: gevent.Greenlet[..., None] | None = None

    def submit(self, rid: str) -> Job:
        job = Job(request_id=rid, body=body(rid), owner="o")
        self.queue.put(job)
        return job

    def start(self) -> None:
        self.greenlet = gevent.spawn(self.worker.run)

    def final(self, rid: str) -> StatusEntry:
        def done() -> StatusEntry | None:
            entry = self.statuses.get(rid)
            return entry if entry and entry.status.final else None

        found: StatusEntry = wait_until(done, timeout=10)
        return found

    def stop(self) -> None:
        if self.greenlet is not None:
            self.worker.stop()
            assert self.worker.wait_stopped(10)
            self.greenlet = None


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**options: Any) -> Rig:
        rigs.append(Rig(tmp_path / str(len(rigs)), **options))
        return rigs[-1]

    yield make
    for made in rigs:
        made.stop()
        made.backend.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


def test_completes_and_acks(rig: Rig) -> None:
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry.status is Status.COMPLETED and entry.attempts == 1
    assert entry.response_json == OK.response_json
    wait_until(lambda: rig.queue.counts().in_flight == 0 and rig.queue.counts().waiting == 0)


def test_retries_with_backoff_then_completes(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail(), fail(retry_after=2.5), OK]
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry.status is Status.COMPLETED and entry.attempts == 3
    assert rig.upstream.calls == ["a", "a", "a"]
    assert 0.375 <= rig.sleeps[0] <= 0.5 and rig.sleeps[1] == 2.5


def test_gives_up_after_max_retries(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail()]
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry.status is Status.ERROR
    assert entry.error == {"message": "boom", "type": "upstream_error", "attempts": 4}
    assert len(rig.upstream.calls) == 4


def test_permanent_failure_is_not_retried(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail(retryable=False)]
    rig.submit("a")
    rig.start()
    assert rig.final("a").attempts_made == 1
    assert rig.upstream.calls == ["a"]


def test_never_more_than_max_concurrent_and_every_slot_busy(rig: Rig) -> None:
    rig.upstream.gate.clear()
    for i in range(6):
        rig.submit(f"r{i}")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 2)
    gevent.sleep(0.1)
    assert rig.upstream.inflight == 2 and rig.queue.counts() == (4, 2)
    rig.upstream.gate.set()
    for i in range(6):
        assert rig.final(f"r{i}").status is Status.COMPLETED
    assert rig.upstream.peak == 2


def test_a_request_in_backoff_keeps_its_slot(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_concurrent=1)
    held = gevent.event.Event()
    rig.sleep = lambda seconds: held.wait()
    rig.upstream.scripts["a"] = [fail(), OK]
    rig.submit("a")
    rig.submit("b")
    rig.start()
    wait_until(lambda: rig.upstream.calls == ["a"])
    gevent.sleep(0.1)
    assert rig.statuses.get("a").status is Status.PROCESSING  # type: ignore[union-attr]
    assert rig.queue.counts().in_flight == 1 and rig.upstream.calls == ["a"]
    held.set()
    assert rig.final("b").status is Status.COMPLETED
    assert rig.upstream.calls == ["a", "a", "b"]
    rig.stop()


def test_redelivered_job_with_a_final_status_is_only_acked(rig: Rig) -> None:
    job = rig.submit("a")
    # An earlier worker claimed it and stored its result, then died before the ack.
    assert claim_one(rig.queue) is not None
    rig.statuses.put("a", entry_for(job, Status.COMPLETED, response_json='{"x": 1}', attempts=1), ttl=60)
    rig.start()
    wait_until(lambda: rig.queue.counts().waiting == 0 and rig.queue.counts().in_flight == 0)
    assert rig.upstream.calls == []
    assert rig.statuses.get("a").response_json == '{"x": 1}'  # type: ignore[union-attr]


def test_a_request_that_keeps_crashing_the_worker_ends_as_error(rig: Rig) -> None:
    job = rig.submit("a")
    # Four earlier workers died during its calls.
    assert claim_one(rig.queue) is not None
    rig.statuses.put("a", entry_for(job, Status.PROCESSING, attempts=4))
    rig.start()
    entry = rig.final("a")
    assert entry.error is not None and entry.error["type"] == "interrupted" and entry.error["attempts"] == 4
    assert rig.upstream.calls == []


def test_orphaned_claims_are_recovered_at_start(rig: Rig) -> None:
    rig.submit("a")
    assert claim_one(rig.queue) is not None  # a previous worker died holding it
    rig.start()
    assert rig.final("a").status is Status.COMPLETED


def test_a_job_whose_lease_another_worker_took_is_dropped_without_a_write(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(lease_seconds=0.3)
    rig.upstream.gate.clear()
    rig.submit("a")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 1)
    # This worker is taken for dead (say it was cut off): its job goes to another worker.
    assert rig.queue.requeue_lapsed(math.inf) == 1
    taken = claim_one(rig.queue, holder="other-worker")
    assert taken is not None and taken.job.request_id == "a"
    # At its next renewal the first worker finds the lease gone and aborts its call.
    wait_until(lambda: rig.upstream.inflight == 0, timeout=5)
    rig.upstream.gate.set()
    gevent.sleep(0.3)
    entry = rig.statuses.get("a")
    assert entry is not None and entry.status is Status.PROCESSING and entry.attempts == 1
    assert rig.queue.holds(taken) and rig.queue.counts() == (0, 1)
    assert rig.upstream.calls == ["a"]


def test_calls_stop_when_leases_cannot_be_renewed_and_resume_once_they_can(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(lease_seconds=0.6)
    renew = rig.queue.renew
    broken = gevent.event.Event()

    def failing_renew(claims: list[Claim], lease_seconds: float) -> Renewal:
        if broken.is_set():
            raise StorageUnavailable("database is locked")
        return renew(claims, lease_seconds)

    rig.queue.renew = failing_renew  # type: ignore[method-assign]
    rig.upstream.gate.clear()
    rig.submit("a")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 1)
    broken.set()
    # Before its lease lapses, the worker stops calling for a job it may no longer hold.
    wait_until(lambda: rig.upstream.inflight == 0, timeout=5)
    broken.clear()
    rig.upstream.gate.set()
    # The lease lapses, the job waits again and runs to its end as a second attempt.
    entry = rig.final("a")
    assert entry.status is Status.COMPLETED and entry.attempts == 2
    assert rig.upstream.calls == ["a", "a"]


def test_a_result_is_kept_while_the_store_cannot_take_it_yet(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    finish = rig.backend.finish
    failures = [StorageUnavailable("database is locked")] * 2

    def flaky_finish(*args: Any, **kwargs: Any) -> bool:
        if failures:
            raise failures.pop()
        return finish(*args, **kwargs)

    rig.backend.finish = flaky_finish  # type: ignore[method-assign]
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    # Stored once the store took it: the upstream's answer was not thrown away and asked again.
    assert entry.status is Status.COMPLETED and entry.attempts == 1
    assert rig.upstream.calls == ["a"] and failures == []


def test_a_cancel_whose_signal_was_lost_reaches_the_worker_at_renewal(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(lease_seconds=0.6)  # no signals: only the store can tell the worker
    rig.upstream.gate.clear()
    rig.submit("a")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 1)
    assert rig.queue.cancel("a") is CancelResult.SIGNALLED
    entry = rig.final("a")
    assert entry.status is Status.CANCELLED
    wait_until(lambda: rig.upstream.inflight == 0, timeout=5)
    rig.upstream.gate.set()


def test_graceful_stop_puts_unfinished_work_back_without_counting_it(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(shutdown_timeout=0.2)
    rig.upstream.gate.clear()
    rig.submit("a")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 1)
    rig.stop()
    entry = rig.statuses.get("a")
    assert entry is not None and entry.status is Status.PENDING and entry.attempts == 0
    assert rig.queue.counts().waiting == 1 and rig.queue.counts().in_flight == 0


def test_final_statuses_expire_after_result_ttl(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(result_ttl=0.3)
    rig.submit("a")
    rig.start()
    rig.final("a")
    wait_until(lambda: rig.statuses.get("a") is None, timeout=5)
    rig.stop()


def test_wakeup_dispatches_without_waiting_for_the_poll(make_rig: Callable[..., Rig]) -> None:
    # With a 60 s poll, only the back end's signal can dispatch within the test's 10 s deadline.
    rig = make_rig(poll_interval=60, signals=True)
    web = rig.backend.web_signals()
    rig.start()
    gevent.sleep(0.1)
    for i in range(1, 6):
        rig.submit(f"w{i}")
        web.work_queued()
        wait_until(functools.partial(lambda n: len(rig.upstream.calls) == n, i), timeout=10, interval=0.005)
        gevent.sleep(0.05)
    rig.stop()
