"""The worker loop in-process, on real storage, with a scripted upstream collaborator."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from conftest import body, wait_until
from sqlite_storage import open_storage
from storage import Job, JobQueue, Status, StatusStore
from upstream import Outcome
from worker import Worker, WorkerSettings, status_entry

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

    def complete(self, request: dict[str, Any]) -> Outcome:
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

    def stream(self, request: dict[str, Any], on_event: Callable[[bytes], None]) -> Outcome:
        outcome = self.complete(request)
        if outcome.ok:
            on_event(b"data: {}\n\n")
        return outcome


class Rig:
    def __init__(self, tmp_path: Path, poll_interval: float = 1.0, **settings: Any) -> None:
        self.queue: JobQueue
        self.statuses: StatusStore
        self.queue, self.statuses = open_storage(tmp_path / "data")
        self.upstream = ScriptedUpstream()
        self.sleeps: list[float] = []
        defaults = dict(
            max_concurrent=2,
            max_retries=3,
            result_ttl=60,
            shutdown_timeout=1,
            retry_base_delay=0.5,
            retry_max_delay=8,
        )
        self.worker = Worker(
            queue=self.queue,
            statuses=self.statuses,
            upstream=self.upstream,
            settings=WorkerSettings(**{**defaults, **settings}),
            sleep=self.sleeps.append,
            poll_interval=poll_interval,
        )
        self.greenlet: gevent.Greenlet[..., None] | None = None

    def submit(self, rid: str) -> Job:
        job = Job(request_id=rid, body=body(rid), owner="o")
        self.queue.put(job)
        return job

    def start(self) -> None:
        self.greenlet = gevent.spawn(self.worker.run)

    def final(self, rid: str) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            entry = self.statuses.get(rid)
            return entry if entry and Status(entry["status"]).final else None

        return dict(wait_until(done, timeout=10))

    def stop(self) -> None:
        self.worker.stop()
        assert self.worker.wait_stopped(10)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.stop()


def test_completes_and_acks(rig: Rig) -> None:
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry["status"] == "completed" and entry["attempts"] == 1
    assert entry["response_json"] == OK.response_json
    wait_until(lambda: rig.queue.in_flight() == 0 and rig.queue.waiting() == 0)


def test_retries_with_backoff_then_completes(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail(), fail(retry_after=2.5), OK]
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry["status"] == "completed" and entry["attempts"] == 3
    assert rig.upstream.calls == ["a", "a", "a"]
    assert 0.375 <= rig.sleeps[0] <= 0.5 and rig.sleeps[1] == 2.5


def test_gives_up_after_max_retries(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail()]
    rig.submit("a")
    rig.start()
    entry = rig.final("a")
    assert entry["status"] == "error"
    assert entry["error"] == {"message": "boom", "type": "upstream_error", "attempts": 4}
    assert len(rig.upstream.calls) == 4


def test_permanent_failure_is_not_retried(rig: Rig) -> None:
    rig.upstream.scripts["a"] = [fail(retryable=False)]
    rig.submit("a")
    rig.start()
    assert rig.final("a")["error"]["attempts"] == 1
    assert rig.upstream.calls == ["a"]


def test_never_more_than_max_concurrent_and_every_slot_busy(rig: Rig) -> None:
    rig.upstream.gate.clear()
    for i in range(6):
        rig.submit(f"r{i}")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 2)
    gevent.sleep(0.1)
    assert rig.upstream.inflight == 2 and rig.queue.waiting() == 4 and rig.queue.in_flight() == 2
    rig.upstream.gate.set()
    for i in range(6):
        assert rig.final(f"r{i}")["status"] == "completed"
    assert rig.upstream.peak == 2


def test_a_request_in_backoff_keeps_its_slot(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_concurrent=1)
    held = gevent.event.Event()
    rig.worker._sleep = lambda seconds: held.wait()
    rig.upstream.scripts["a"] = [fail(), OK]
    rig.submit("a")
    rig.submit("b")
    rig.start()
    wait_until(lambda: rig.upstream.calls == ["a"])
    gevent.sleep(0.1)
    assert rig.statuses.get("a")["status"] == "processing"  # type: ignore[index]
    assert rig.queue.in_flight() == 1 and rig.upstream.calls == ["a"]
    held.set()
    assert rig.final("b")["status"] == "completed"
    assert rig.upstream.calls == ["a", "a", "b"]
    rig.stop()


def test_redelivered_job_with_a_final_status_is_only_acked(rig: Rig) -> None:
    job = rig.submit("a")
    # An earlier worker claimed it and stored its result, then died before the ack.
    assert rig.queue.claim() is not None
    rig.statuses.put("a", status_entry(job, Status.COMPLETED, response_json='{"x": 1}', attempts=1), ttl=60)
    rig.start()
    wait_until(lambda: rig.queue.waiting() == 0 and rig.queue.in_flight() == 0)
    assert rig.upstream.calls == []
    assert rig.statuses.get("a")["response_json"] == '{"x": 1}'  # type: ignore[index]


def test_a_request_that_keeps_crashing_the_worker_ends_as_error(rig: Rig) -> None:
    job = rig.submit("a")
    # Four earlier workers died during its calls.
    assert rig.queue.claim() is not None
    rig.statuses.put("a", status_entry(job, Status.PROCESSING, attempts=4))
    rig.start()
    entry = rig.final("a")
    assert entry["error"]["type"] == "interrupted" and entry["error"]["attempts"] == 4
    assert rig.upstream.calls == []


def test_orphaned_claims_are_recovered_at_start(rig: Rig) -> None:
    rig.submit("a")
    assert rig.queue.claim() is not None  # a previous worker died holding it
    rig.start()
    assert rig.final("a")["status"] == "completed"


def test_graceful_stop_puts_unfinished_work_back_without_counting_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, shutdown_timeout=0.2)
    rig.upstream.gate.clear()
    rig.submit("a")
    rig.start()
    wait_until(lambda: rig.upstream.inflight == 1)
    rig.stop()
    entry = rig.statuses.get("a")
    assert entry is not None and entry["status"] == "pending" and entry["attempts"] == 0
    assert rig.queue.waiting() == 1 and rig.queue.in_flight() == 0


def test_final_statuses_expire_after_result_ttl(tmp_path: Path) -> None:
    rig = Rig(tmp_path, result_ttl=0.3)
    rig.submit("a")
    rig.start()
    rig.final("a")
    wait_until(lambda: rig.statuses.get("a") is None, timeout=5)
    rig.stop()


def test_wakeup_dispatches_without_waiting_for_the_poll(tmp_path: Path) -> None:
    from wakeup import WakeupListener, WakeupSender

    data = tmp_path / "data"
    # With a 60 s poll, only the nudge can dispatch within the test's 10 s deadline.
    rig = Rig(tmp_path, poll_interval=60)
    listener = WakeupListener(data)
    assert listener.available
    rig.worker._waker = listener
    rig.start()
    gevent.sleep(0.1)
    sender = WakeupSender(data)
    for i in range(1, 6):
        rig.submit(f"w{i}")
        sender.notify()
        wait_until(functools.partial(lambda n: len(rig.upstream.calls) == n, i), timeout=10, interval=0.005)
        gevent.sleep(0.05)
    rig.stop()
    listener.close()
    sender.close()
