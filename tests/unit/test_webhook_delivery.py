"""Webhook delivery: the pure retry step, and the deliverer draining an outbox into a sender while it
reports progress on the status entry. The outbox, the status store and the sender are small in-memory
stand-ins: the deliverer is what is under test."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
import gevent.event
import pytest

from llm_proxy.domain.status import Status, StatusEntry, WebhookProgress, WebhookState
from llm_proxy.storage.base import Claim, Delivery, Outbox, OwedDelivery, StatusStore
from llm_proxy.webhooks.delivery import (
    JITTER,
    RETRY_AFTER_CAP,
    SCHEDULE,
    WebhookDeliverer,
    after_attempt,
    destination,
    destination_slots,
)
from llm_proxy.webhooks.sender import Attempt

NOW = 1_700_000_000.0
BASE = 5.0
FAILED_500 = Attempt(status=500, error="the receiver answered HTTP 500")
DELIVERED_200 = Attempt(delivered=True, status=200)
GONE_410 = Attempt(final=True, status=410, error="the receiver answered 410 Gone")


def ms(seconds: float) -> int:
    return int(seconds * 1000)


# -- after_attempt: pure ------------------------------------------------------------------------


def test_a_delivered_attempt() -> None:
    progress = after_attempt(WebhookProgress(), DELIVERED_200, BASE, random.Random(0), NOW)
    assert progress == WebhookProgress(
        state=WebhookState.DELIVERED, attempts=1, last_status=200, last_error=None, next_attempt_at=None
    )


def test_delivered_after_failures_clears_the_error_and_the_schedule() -> None:
    before = WebhookProgress(attempts=2, last_status=500, last_error="boom", next_attempt_at=ms(NOW))
    progress = after_attempt(before, DELIVERED_200, BASE, random.Random(0), NOW)
    assert progress == WebhookProgress(state=WebhookState.DELIVERED, attempts=3, last_status=200)


def test_a_final_failure_stops_at_once() -> None:
    progress = after_attempt(WebhookProgress(), GONE_410, BASE, random.Random(0), NOW)
    assert progress == WebhookProgress(
        state=WebhookState.FAILED,
        attempts=1,
        last_status=410,
        last_error="the receiver answered 410 Gone",
        next_attempt_at=None,
    )


def test_a_refused_destination_fails_without_a_status() -> None:
    refused = Attempt(final=True, error="refused: the webhook host resolves to 10.0.0.1, not public")
    progress = after_attempt(WebhookProgress(), refused, BASE, random.Random(0), NOW)
    assert progress.state is WebhookState.FAILED
    assert progress.last_status is None and progress.last_error == refused.error


@pytest.mark.parametrize("failures", range(len(SCHEDULE)))
@pytest.mark.parametrize("seed", range(10))
def test_a_failure_schedules_the_next_attempt_from_now(failures: int, seed: int) -> None:
    before = WebhookProgress(attempts=failures, last_status=500, last_error="x")
    progress = after_attempt(before, FAILED_500, BASE, random.Random(seed), NOW)
    assert progress.state is WebhookState.PENDING
    assert progress.attempts == failures + 1
    assert (progress.last_status, progress.last_error) == (500, FAILED_500.error)
    wait = BASE * SCHEDULE[failures]
    assert progress.next_attempt_at is not None
    assert ms(NOW + wait * (1 - JITTER)) <= progress.next_attempt_at <= ms(NOW + wait * (1 + JITTER))


def test_the_schedule_counts_from_the_now_passed_in() -> None:
    earlier = after_attempt(WebhookProgress(), FAILED_500, BASE, random.Random(3), NOW)
    later = after_attempt(WebhookProgress(), FAILED_500, BASE, random.Random(3), NOW + 100)
    assert earlier.next_attempt_at is not None and later.next_attempt_at is not None
    assert later.next_attempt_at - earlier.next_attempt_at == pytest.approx(100_000, abs=1)


def test_a_retry_after_is_honoured_and_capped() -> None:
    busy = Attempt(status=503, error="the receiver answered HTTP 503", retry_after=42.0)
    progress = after_attempt(WebhookProgress(), busy, BASE, random.Random(0), NOW)
    assert progress.state is WebhookState.PENDING and progress.next_attempt_at == ms(NOW + 42.0)
    very_busy = Attempt(status=429, error="the receiver answered HTTP 429", retry_after=86_400.0)
    progress = after_attempt(WebhookProgress(), very_busy, BASE, random.Random(0), NOW)
    assert progress.next_attempt_at == ms(NOW + RETRY_AFTER_CAP)


def test_it_gives_up_after_every_scheduled_retry_failed() -> None:
    rand = random.Random(11)
    progress = WebhookProgress()
    waits: list[float] = []
    while True:
        progress = after_attempt(progress, FAILED_500, BASE, rand, NOW)
        if progress.state is not WebhookState.PENDING:
            break
        assert progress.next_attempt_at is not None
        waits.append((progress.next_attempt_at - ms(NOW)) / 1000 / BASE)
    # One first attempt, then one retry per step of the schedule, each after its own wait.
    assert progress.attempts == len(SCHEDULE) + 1
    assert progress == WebhookProgress(
        state=WebhookState.FAILED,
        attempts=len(SCHEDULE) + 1,
        last_status=500,
        last_error=FAILED_500.error,
        next_attempt_at=None,
    )
    assert len(waits) == len(SCHEDULE)
    for wait, step in zip(waits, SCHEDULE, strict=True):
        assert step * (1 - JITTER) - 0.001 <= wait <= step * (1 + JITTER)


def test_a_retry_after_does_not_extend_the_schedule() -> None:
    exhausted = WebhookProgress(attempts=len(SCHEDULE), last_status=503)
    busy = Attempt(status=503, error="the receiver answered HTTP 503", retry_after=1.0)
    progress = after_attempt(exhausted, busy, BASE, random.Random(0), NOW)
    assert progress.state is WebhookState.FAILED and progress.next_attempt_at is None


# -- the deliverer, against in-memory collaborators ---------------------------------------------


class MemoryOutbox(Outbox):
    def __init__(self) -> None:
        self.owed: list[OwedDelivery] = []
        self.taken: set[int] = set()
        self.finished: list[int] = []
        self.kept: list[list[int]] = []
        self.lost: set[int] = set()
        """Deliveries another sender took up (this one was cut off past its hold)."""

    def owe(self, delivery: Delivery) -> None:
        self.owed.append(OwedDelivery(len(self.owed) + 1, delivery))

    def take(self, limit: int, *, hold: float) -> list[OwedDelivery]:
        batch = [o for o in self.owed if o.ticket not in self.taken and o.ticket not in self.finished]
        batch = batch[:limit]
        self.taken.update(o.ticket for o in batch)
        return batch

    def keep(self, owed: list[OwedDelivery], *, hold: float) -> set[int]:
        self.kept.append([o.ticket for o in owed])
        return {o.ticket for o in owed} - self.lost

    def done(self, owed: OwedDelivery) -> None:
        self.finished.append(owed.ticket)

    def recover(self) -> int:
        lost = self.taken - set(self.finished)
        self.taken -= lost
        return len(lost)

    def compact(self) -> int:
        return 0

    def close(self) -> None:
        pass


class MemoryStatuses(StatusStore):
    def __init__(self) -> None:
        self.entries: dict[str, StatusEntry] = {}
        self.webhook_history: dict[str, list[WebhookProgress | None]] = {}

    def put(
        self, request_id: str, entry: StatusEntry, ttl: float | None = None, *, claim: Claim | None = None
    ) -> None:
        self.entries[request_id] = entry

    def get(self, request_id: str) -> StatusEntry | None:
        return self.entries.get(request_id)

    def update(
        self, request_id: str, change: Callable[[StatusEntry], StatusEntry | None]
    ) -> StatusEntry | None:
        entry = self.entries.get(request_id)
        if entry is None:
            return None
        changed = change(entry)
        if changed is not None:
            self.entries[request_id] = changed
            self.webhook_history.setdefault(request_id, []).append(changed.webhook)
            return changed
        return entry

    def purge_expired(self) -> int:
        return 0

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Sent:
    url: str
    webhook_id: str
    body: str
    at: float


@dataclass
class ScriptedSender:
    """Answers each URL's attempts from its script, in order; the last answer repeats."""

    scripts: dict[str, list[Attempt]]
    gate: gevent.event.Event | None = None
    """When given, every send blocks until it is set (a receiver that is slow to answer)."""
    gates: dict[str, gevent.event.Event] = field(default_factory=dict)
    """Per host: sends to it block until its gate is set."""
    sent: list[Sent] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    """Sends under way, per host; ``most`` is the highest each one reached."""
    most: Counter[str] = field(default_factory=Counter)

    def send(self, url: str, webhook_id: str, body: str) -> Attempt:
        self.sent.append(Sent(url, webhook_id, body, time.time()))
        host = urlsplit(url).netloc
        self.in_flight[host] += 1
        self.most[host] = max(self.most[host], self.in_flight[host])
        try:
            if self.gate is not None:
                self.gate.wait()
            if host in self.gates:
                self.gates[host].wait()
        finally:
            self.in_flight[host] -= 1
        script = self.scripts[url]
        return script.pop(0) if len(script) > 1 else script[0]

    def calls(self, url: str) -> list[Sent]:
        return [s for s in self.sent if s.url == url]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        gevent.sleep(0.005)


def completed(request_id: str, webhook: WebhookProgress | None = None) -> StatusEntry:
    return StatusEntry(
        status=Status.COMPLETED,
        request_json='{"model": "m", "messages": []}',
        owner="owner-a",
        timestamp=ms(time.time()),
        response_json=f'{{"id": "chatcmpl-{request_id}"}}',
        webhook=webhook or WebhookProgress(),
    )


def delivery(request_id: str, host: str = "hooks.example") -> Delivery:
    return Delivery(
        request_id=request_id,
        owner="owner-a",
        url=f"https://{host}/{request_id}",
        payload=f'{{"request_id": "{request_id}", "status": "completed"}}',
    )


@dataclass
class Harness:
    outbox: MemoryOutbox
    statuses: MemoryStatuses
    sender: ScriptedSender
    deliverer: WebhookDeliverer

    def webhook(self, request_id: str) -> WebhookProgress | None:
        entry = self.statuses.get(request_id)
        return entry.webhook if entry else None

    def is_done(self, request_id: str) -> bool:
        return any(
            o.ticket in self.outbox.finished for o in self.outbox.owed if o.delivery.request_id == request_id
        )


@pytest.fixture
def harness() -> Iterator[Harness]:
    outbox, statuses = MemoryOutbox(), MemoryStatuses()
    sender = ScriptedSender(scripts={})
    deliverer = WebhookDeliverer(
        outbox=outbox,
        statuses=statuses,
        sender=sender,
        retry_base=0.01,
        concurrency=4,
        poll_interval=30.0,  # only owe()'s nudge (or the start) makes it look again
        rand=random.Random(1234),
    )
    yield Harness(outbox, statuses, sender, deliverer)


@pytest.fixture
def running(harness: Harness) -> Iterator[Harness]:
    runner = gevent.spawn(harness.deliverer.run)
    try:
        yield harness
    finally:
        harness.deliverer.stop()
        runner.join(timeout=5)
        stopped = runner.dead
        runner.kill()
    assert stopped, "run() did not return after stop()"


def owe(
    harness: Harness,
    request_id: str,
    script: list[Attempt],
    webhook: WebhookProgress | None = None,
    host: str = "hooks.example",
) -> None:
    harness.statuses.put(request_id, completed(request_id, webhook))
    harness.sender.scripts[delivery(request_id, host).url] = script
    harness.outbox.owe(delivery(request_id, host))
    harness.deliverer.nudge()


def test_a_successful_delivery_is_recorded_and_done(running: Harness) -> None:
    owe(running, "req-ok", [DELIVERED_200])
    wait_for(lambda: running.is_done("req-ok"))
    assert running.webhook("req-ok") == WebhookProgress(
        state=WebhookState.DELIVERED, attempts=1, last_status=200
    )
    assert running.sender.sent == [
        Sent(delivery("req-ok").url, "msg_req-ok", delivery("req-ok").payload, running.sender.sent[0].at)
    ]
    entry = running.statuses.get("req-ok")
    # Only the webhook field changed: the result is as it was.
    assert entry is not None and entry.status is Status.COMPLETED
    assert entry.response_json == '{"id": "chatcmpl-req-ok"}'


def test_a_failing_delivery_is_retried_on_schedule_until_delivered(running: Harness) -> None:
    owe(running, "req-retry", [FAILED_500, FAILED_500, DELIVERED_200])
    wait_for(lambda: running.is_done("req-retry"))
    assert running.webhook("req-retry") == WebhookProgress(
        state=WebhookState.DELIVERED, attempts=3, last_status=200
    )
    history = running.statuses.webhook_history["req-retry"]
    assert [(p.state, p.attempts, p.last_status) for p in history if p] == [
        (WebhookState.PENDING, 1, 500),
        (WebhookState.PENDING, 2, 500),
        (WebhookState.DELIVERED, 3, 200),
    ]
    # While pending, users saw why and when the next attempt comes.
    assert history[0] is not None and history[0].last_error == FAILED_500.error
    calls = running.sender.calls(delivery("req-retry").url)
    assert len(calls) == 3
    assert {c.webhook_id for c in calls} == {"msg_req-retry"}  # the same id on every retry
    for scheduled, call in zip(history[:2], calls[1:], strict=True):
        assert scheduled is not None and scheduled.next_attempt_at is not None
        assert call.at >= scheduled.next_attempt_at / 1000 - 0.005  # not retried before its time
    assert running.outbox.finished == [1]


def test_a_final_failure_stops_at_once_as_failed(running: Harness) -> None:
    owe(running, "req-gone", [GONE_410, DELIVERED_200])
    wait_for(lambda: running.is_done("req-gone"))
    assert running.webhook("req-gone") == WebhookProgress(
        state=WebhookState.FAILED, attempts=1, last_status=410, last_error=GONE_410.error
    )
    assert len(running.sender.calls(delivery("req-gone").url)) == 1


def test_a_delivery_whose_retries_all_fail_ends_as_failed(harness: Harness) -> None:
    # A run that was stopped with every retry but the last already made.
    harness.deliverer = WebhookDeliverer(
        outbox=harness.outbox,
        statuses=harness.statuses,
        sender=harness.sender,
        retry_base=0.0001,
        concurrency=1,
        poll_interval=30.0,
        rand=random.Random(5),
    )
    runner = gevent.spawn(harness.deliverer.run)
    try:
        owe(harness, "req-down", [FAILED_500])
        wait_for(lambda: harness.is_done("req-down"))
    finally:
        harness.deliverer.stop()
        runner.join(timeout=5)
        runner.kill()
    assert harness.webhook("req-down") == WebhookProgress(
        state=WebhookState.FAILED, attempts=len(SCHEDULE) + 1, last_status=500, last_error=FAILED_500.error
    )
    assert len(harness.sender.sent) == len(SCHEDULE) + 1


def test_a_duplicate_of_a_delivery_under_way_is_dropped(harness: Harness) -> None:
    # Owed twice (again after a crash): both copies are in the outbox when the deliverer starts.
    harness.sender.gate = gevent.event.Event()
    harness.statuses.put("req-dup", completed("req-dup"))
    harness.sender.scripts[delivery("req-dup").url] = [DELIVERED_200]
    harness.outbox.owe(delivery("req-dup"))
    harness.outbox.owe(delivery("req-dup"))
    runner = gevent.spawn(harness.deliverer.run)
    try:
        wait_for(lambda: len(harness.sender.sent) == 1 and 2 in harness.outbox.finished)
        # The copy is dropped while the first is still waiting for its receiver.
        assert harness.outbox.finished == [2]
        harness.sender.gate.set()
        wait_for(lambda: sorted(harness.outbox.finished) == [1, 2])
    finally:
        harness.deliverer.stop()
        runner.join(timeout=5)
        runner.kill()
    assert len(harness.sender.sent) == 1
    assert harness.webhook("req-dup") == WebhookProgress(
        state=WebhookState.DELIVERED, attempts=1, last_status=200
    )


def test_a_delivery_already_delivered_is_just_marked_done(running: Harness) -> None:
    delivered = WebhookProgress(state=WebhookState.DELIVERED, attempts=2, last_status=204)
    owe(running, "req-old", [DELIVERED_200], webhook=delivered)
    wait_for(lambda: running.is_done("req-old"))
    assert running.sender.sent == []
    assert running.webhook("req-old") == delivered
    assert "req-old" not in running.statuses.webhook_history


def test_a_slow_receiver_does_not_hold_up_other_deliveries(running: Harness) -> None:
    running.sender.gate = gevent.event.Event()
    owe(running, "req-slow", [DELIVERED_200])
    wait_for(lambda: len(running.sender.sent) == 1)
    running.sender.gate = None  # later sends answer at once; the first still hangs on its own gate
    owe(running, "req-fast", [DELIVERED_200], host="other.example")
    wait_for(lambda: running.is_done("req-fast"))
    assert not running.is_done("req-slow")
    assert running.webhook("req-slow") == WebhookProgress()


def test_deliveries_under_way_are_kept_and_let_go_once_done(harness: Harness) -> None:
    # A short hold: the deliverer keeps what it works on every third of it.
    harness.deliverer = WebhookDeliverer(
        outbox=harness.outbox,
        statuses=harness.statuses,
        sender=harness.sender,
        retry_base=0.01,
        concurrency=4,
        poll_interval=30.0,
        hold=0.15,
        rand=random.Random(7),
    )
    gate = gevent.event.Event()
    harness.sender.gate = gate
    runner = gevent.spawn(harness.deliverer.run)
    try:
        owe(harness, "req-slow", [DELIVERED_200])
        wait_for(lambda: [1] in harness.outbox.kept)
        gate.set()
        wait_for(lambda: harness.is_done("req-slow"))
        seen = len(harness.outbox.kept)
        wait_for(lambda: len(harness.outbox.kept) > seen)
        assert harness.outbox.kept[-1] == []
    finally:
        harness.deliverer.stop()
        runner.join(timeout=5)
        runner.kill()


# -- one destination's share of the sending slots -----------------------------------------------


def deliverer_with(harness: Harness, concurrency: int) -> WebhookDeliverer:
    """The harness's deliverer replaced by one with ``concurrency`` shared slots (owe() nudges it)."""
    harness.deliverer = WebhookDeliverer(
        outbox=harness.outbox,
        statuses=harness.statuses,
        sender=harness.sender,
        retry_base=0.01,
        concurrency=concurrency,
        poll_interval=30.0,
        rand=random.Random(9),
    )
    return harness.deliverer


@contextmanager
def running_deliverer(deliverer: WebhookDeliverer) -> Iterator[WebhookDeliverer]:
    runner = gevent.spawn(deliverer.run)
    try:
        yield deliverer
    finally:
        deliverer.stop()
        runner.join(timeout=5)
        runner.kill()


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://Hooks.Example/a", "hooks.example:443"),
        ("http://hooks.example./b", "hooks.example:80"),
        ("http://hooks.example:8080/c?x=1", "hooks.example:8080"),
        ("https://hooks.example:443/d", "hooks.example:443"),
        ("http://[2606:4700::1111]:81/e", "[2606:4700::1111]:81"),
    ],
)
def test_a_destination_is_its_host_and_port(url: str, key: str) -> None:
    assert destination(url) == key


def test_a_destination_gets_a_quarter_of_the_slots_and_at_least_one() -> None:
    assert [destination_slots(n) for n in (1, 3, 4, 7, 8, 32, 100)] == [1, 1, 1, 1, 2, 8, 25]


def test_a_blocked_destination_does_not_delay_deliveries_elsewhere(harness: Harness) -> None:
    # Four shared slots, one per destination: twenty deliveries to a receiver that never answers
    # take one, and the other three destinations get the other three.
    harness.sender.gates = {"stuck.example": gevent.event.Event(), "slow.example": gevent.event.Event()}
    with running_deliverer(deliverer_with(harness, concurrency=4)):
        for n in range(20):
            owe(harness, f"req-stuck-{n}", [DELIVERED_200], host="stuck.example")
        wait_for(lambda: harness.sender.in_flight["stuck.example"] == 1)
        owe(harness, "req-slow-a", [DELIVERED_200], host="slow.example")
        owe(harness, "req-other", [DELIVERED_200], host="other.example")
        wait_for(lambda: harness.is_done("req-other"), timeout=2)
        # Waiting for their own destination, the other nineteen hold no shared slot: a fourth
        # destination still finds one while two others are busy.
        owe(harness, "req-slow-b", [DELIVERED_200], host="slow.example:8443")
        owe(harness, "req-last", [DELIVERED_200], host="last.example")
        wait_for(lambda: harness.is_done("req-last"), timeout=2)
        assert harness.sender.in_flight["stuck.example"] == 1
        assert len(harness.sender.calls(delivery("req-stuck-0", "stuck.example").url)) == 1
        assert not any(harness.is_done(f"req-stuck-{n}") for n in range(20))
        harness.sender.gates["stuck.example"].set()
        harness.sender.gates["slow.example"].set()
        wait_for(lambda: all(harness.is_done(f"req-stuck-{n}") for n in range(20)))
    assert harness.sender.most["stuck.example"] == 1


def test_sends_to_one_destination_stay_within_its_share(harness: Harness) -> None:
    hosts = ["a.example", "b.example:8443"]
    harness.sender.gates = {host: gevent.event.Event() for host in hosts}
    with running_deliverer(deliverer_with(harness, concurrency=8)):
        for host in hosts:
            for n in range(12):
                owe(harness, f"req-{host}-{n}", [FAILED_500, DELIVERED_200], host=host)
        wait_for(lambda: all(harness.sender.in_flight[host] == 2 for host in hosts))
        gevent.sleep(0.05)  # room for a third send that should not start
        assert [harness.sender.in_flight[host] for host in hosts] == [2, 2]
        for host in hosts:
            harness.sender.gates[host].set()
        wait_for(lambda: all(harness.is_done(f"req-{host}-{n}") for host in hosts for n in range(12)))
    # Retries included, never more than two at a time to one destination.
    assert [harness.sender.most[host] for host in hosts] == [2, 2]
    assert len(harness.sender.sent) == 2 * 2 * 12


def test_idle_destinations_are_forgotten(harness: Harness) -> None:
    gate = gevent.event.Event()
    harness.sender.gates = {"busy.example": gate}
    deliverer = deliverer_with(harness, concurrency=4)
    with running_deliverer(deliverer):
        for n in range(50):
            owe(harness, f"req-{n}", [DELIVERED_200], host=f"host-{n}.example")
        owe(harness, "req-busy-1", [DELIVERED_200], host="busy.example")
        owe(harness, "req-busy-2", [DELIVERED_200], host="busy.example")
        wait_for(lambda: all(harness.is_done(f"req-{n}") for n in range(50)))
        # Only the destination still sending (one delivery) or waiting (the other) is remembered.
        assert list(deliverer._destinations) == ["busy.example:443"]
        gate.set()
        wait_for(lambda: harness.is_done("req-busy-1") and harness.is_done("req-busy-2"))
        assert deliverer._destinations == {}


def test_a_delivery_taken_up_by_another_sender_stops_here(harness: Harness) -> None:
    harness.deliverer = WebhookDeliverer(
        outbox=harness.outbox,
        statuses=harness.statuses,
        sender=harness.sender,
        retry_base=30.0,  # its next attempt would come long after the test
        concurrency=4,
        poll_interval=30.0,
        hold=0.15,
        rand=random.Random(7),
    )
    runner = gevent.spawn(harness.deliverer.run)
    try:
        owe(harness, "req-lost", [FAILED_500])
        wait_for(lambda: len(harness.sender.calls(delivery("req-lost").url)) == 1)
        wait_for(lambda: [1] in harness.outbox.kept)
        harness.outbox.lost.add(1)
        # This sender lets it go: no longer kept, never sent again from here, not marked done.
        wait_for(lambda: harness.outbox.kept[-1] == [])
        assert len(harness.sender.calls(delivery("req-lost").url)) == 1
        assert harness.outbox.finished == []
    finally:
        harness.deliverer.stop()
        runner.join(timeout=5)
        runner.kill()
