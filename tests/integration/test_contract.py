"""The storage seam's contract: every method of every interface in ``llm_proxy.storage.base``,
run against each back end. A new back end is one more entry in ``BACKENDS``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Attempt, Status, StatusEntry, WebhookProgress, WebhookState
from llm_proxy.storage.base import (
    ALL_MODELS,
    Backend,
    CancelResult,
    Claim,
    Delivery,
    IdempotencyConflict,
    JobQueue,
    QueueFull,
    RateGate,
    StorageUnavailable,
    Submitted,
)
from llm_proxy.storage.factory import open_backend
from support.harness import wait_until


@pytest.fixture(params=["embedded", "postgres"])
def opener(request: pytest.FixtureRequest) -> Callable[[Path], Backend]:
    """Opens the back end under test; a new back end is one more parameter here."""
    if request.param == "postgres":
        url = request.getfixturevalue("database_url")
        return lambda tmp_path: open_backend(data_dir=tmp_path / "data", database_url=url)
    return lambda tmp_path: open_backend(data_dir=tmp_path / "data")


@pytest.fixture
def backend(opener: Callable[[Path], Backend], tmp_path: Path) -> Iterator[Backend]:
    opened = opener(tmp_path)
    yield opened
    opened.close()


def job(n: int, owner: str = "o") -> Job:
    return Job(request_id=f"chatreq_{n:020d}", body={"model": "m", "n": n}, owner=owner)


def claim(queue: JobQueue, limit: int = 1, holder: str = "w1", lease: float = 60.0) -> list[Claim]:
    return queue.claim_many(limit, holder=holder, lease_seconds=lease)


def place(queue: JobQueue, n: int) -> int | None:
    found = queue.find(job(n).request_id)
    return found.position if found else None


def entry(status: Status = Status.PROCESSING, **fields: object) -> StatusEntry:
    return StatusEntry(status=status, request_json='{"n": 1}', owner="o", timestamp=1, **fields)  # type: ignore[arg-type]


# -- JobQueue --------------------------------------------------------------------------------------


def test_fifo_claim_and_ack(backend: Backend) -> None:
    queue = backend.queue
    tickets = [queue.put(job(i)) for i in range(3)]
    assert queue.counts() == (3, 0)
    [first] = claim(queue)
    assert first.job == job(0) and first.ticket == tickets[0] and first.fresh
    assert first.lease.holder == "w1" and first.lease.expires_at > time.time() + 50
    assert queue.counts() == (2, 1)
    assert queue.ack(first)
    assert queue.counts() == (2, 0)
    [second] = claim(queue)
    assert second.job == job(1)


def test_claim_many_takes_the_oldest_in_one_step(backend: Backend) -> None:
    queue = backend.queue
    for i in range(5):
        queue.put(job(i))
    claims = claim(queue, limit=3)
    assert [c.job for c in claims] == [job(0), job(1), job(2)]
    assert queue.counts() == (2, 3)
    started = time.monotonic()
    assert len(claim(queue, limit=10)) == 2
    assert claim(queue) == []
    assert time.monotonic() - started < 1.0  # never blocks


def test_concurrent_puts_all_land_and_leave_in_ticket_order(backend: Backend) -> None:
    queue = backend.queue
    greenlets = [gevent.spawn(queue.put, job(i)) for i in range(50)]
    gevent.joinall(greenlets, raise_error=True)
    tickets = {job(i).request_id: g.value for i, g in enumerate(greenlets)}
    assert len(set(tickets.values())) == 50 and queue.counts().waiting == 50
    claimed = claim(queue, limit=50)
    assert [c.job.request_id for c in claimed] == sorted(tickets, key=tickets.__getitem__)


def test_find_reports_the_job_and_its_place_until_finished(backend: Backend) -> None:
    queue = backend.queue
    sent = Job(request_id="chatreq_found0000000000000", owner="o", submitted_at=1234, body={"x": "é🙂"})
    ticket = queue.put(sent)
    for i in range(3):
        queue.put(job(i))
    found = queue.find(sent.request_id)
    assert found is not None
    assert (found.ticket, found.owner, found.submitted_at) == (ticket, "o", 1234)
    assert json.loads(found.body_json) == sent.body
    assert found.fresh and not found.in_flight and found.position == 1
    assert [place(queue, i) for i in range(3)] == [2, 3, 4]
    [taken] = claim(queue)
    in_flight = queue.find(sent.request_id)
    assert in_flight is not None and in_flight.in_flight and in_flight.position is None
    assert [place(queue, i) for i in range(3)] == [1, 2, 3]
    queue.ack(taken)
    assert queue.find(sent.request_id) is None and queue.find("chatreq_unknown") is None


def test_positions_and_counts_stay_exact_through_every_transition(backend: Backend) -> None:
    queue = backend.queue
    for i in range(12):
        queue.put(job(i))
    claims = claim(queue, limit=4)
    assert queue.ack(claims[0]) and queue.release(claims[2])
    waiting_ids = [2, *range(4, 12)]
    assert queue.counts() == (len(waiting_ids), 2)
    assert [place(queue, i) for i in waiting_ids] == list(range(1, len(waiting_ids) + 1))
    released = queue.find(job(2).request_id)
    assert released is not None and not released.fresh
    queue.compact()
    assert queue.counts() == (len(waiting_ids), 2)


def test_max_waiting_is_exact_under_concurrent_puts(backend: Backend) -> None:
    queue = backend.queue
    queue.put(job(0))

    def put(i: int) -> bool:
        try:
            if i % 2:
                queue.put_once(job(i), f"key-{i}", max_waiting=5)
            else:
                queue.put(job(i), max_waiting=5)
        except QueueFull as exc:
            assert exc.limit == 5
            return False
        return True

    greenlets = [gevent.spawn(put, i) for i in range(1, 41)]
    gevent.joinall(greenlets, raise_error=True)
    assert sum(g.value for g in greenlets) == 4
    assert queue.counts().waiting == 5
    # A replay of a key is answered whether or not the queue is full; a refused key stays free.
    stored = next(i for i, g in zip(range(1, 41), greenlets, strict=True) if g.value and i % 2)
    assert queue.put_once(job(stored), f"key-{stored}", max_waiting=5).replayed
    refused = next(i for i, g in zip(range(1, 41), greenlets, strict=True) if not g.value and i % 2)
    [taken] = claim(queue)
    assert queue.ack(taken)
    assert not queue.put_once(job(refused), f"key-{refused}", max_waiting=5).replayed


def test_release_puts_a_job_back_at_its_place(backend: Backend) -> None:
    queue = backend.queue
    for i in range(3):
        queue.put(job(i))
    [taken] = claim(queue)
    assert queue.release(taken)
    [again] = claim(queue)
    assert again.job == job(0) and not again.fresh
    assert again.lease.token != taken.lease.token


def test_a_stale_lease_changes_nothing(backend: Backend) -> None:
    queue = backend.queue
    queue.put(job(0))
    [old] = claim(queue, holder="w1", lease=0.05)
    time.sleep(0.1)
    assert queue.requeue_lapsed(time.time()) == 1
    [new] = claim(queue, holder="w2")
    assert new.job == job(0) and new.lease.token != old.lease.token
    assert not queue.holds(old) and queue.holds(new)
    # The worker that lost its lease can neither finish nor hand back the new holder's job.
    assert not queue.ack(old)
    assert not queue.release(old)
    assert queue.counts() == (0, 1)
    assert queue.ack(new)
    assert not queue.holds(new)
    assert queue.counts() == (0, 0)


def test_renew_extends_only_current_leases(backend: Backend) -> None:
    queue = backend.queue
    for i in range(3):
        queue.put(job(i))
    # Long enough for the claims, ack and renewal below on a loaded machine.
    mine = claim(queue, limit=2, holder="w1", lease=1.0)
    [theirs] = claim(queue, holder="w2", lease=1.0)
    queue.ack(mine[1])
    assert queue.renew(mine, 60).held == {(mine[0].ticket, mine[0].lease.token)}
    time.sleep(1.1)
    # Only w2's lease lapsed: w1 renewed in time.
    assert queue.requeue_lapsed(time.time()) == 1
    assert queue.holds(mine[0]) and not queue.holds(theirs)
    assert queue.renew([theirs], 60).held == set()
    assert queue.counts() == (1, 1)
    # The same worker taking the job again gets a new token; the old claim stays lost.
    [again] = claim(queue, holder="w2")
    assert again.ticket == theirs.ticket and again.lease.token != theirs.lease.token
    assert queue.renew([theirs, again], 60).held == {(again.ticket, again.lease.token)}
    # A cancel recorded for a held job is reported at renewal, whether or not its signal arrived.
    assert queue.renew([again], 60).cancelled == set()
    assert queue.cancel(again.job.request_id) is CancelResult.SIGNALLED
    assert queue.renew([again], 60).cancelled == {again.ticket}


def test_requeue_lapsed_spares_live_leases_unless_told_every_holder_is_gone(backend: Backend) -> None:
    queue = backend.queue
    queue.put(job(0))
    queue.put(job(1))
    claim(queue, limit=2)
    assert queue.requeue_lapsed(time.time()) == 0
    assert queue.counts() == (0, 2)
    assert queue.requeue_lapsed(math.inf) == 2
    assert queue.counts() == (2, 0)
    assert [c.job for c in claim(queue, limit=2)] == [job(0), job(1)]


def test_cancel_withdraws_a_waiting_job_and_flags_a_claimed_one(backend: Backend) -> None:
    queue = backend.queue
    queue.put(job(0))
    queue.put(job(1))
    [running] = claim(queue)
    assert queue.cancel(job(1).request_id) is CancelResult.WITHDRAWN
    assert queue.find(job(1).request_id) is None and queue.counts() == (0, 1)
    assert claim(queue) == []  # never handed out
    assert not queue.cancel_requested(job(0).request_id)
    assert queue.cancel(job(0).request_id) is CancelResult.SIGNALLED
    assert queue.cancel_requested(job(0).request_id)
    assert queue.cancel("chatreq_unknown000000000") is CancelResult.ABSENT
    # A cancelled job claimed again (after its worker died) says so.
    queue.requeue_lapsed(math.inf)
    [again] = claim(queue)
    assert again.job == running.job and again.cancel_requested
    queue.ack(again)
    assert queue.cancel(job(0).request_id) is CancelResult.ABSENT


def test_an_opening_is_stored_with_the_claim_where_the_store_can(backend: Backend) -> None:
    """A claim given an opening either stores it as the status of each fresh claim without a
    cancel, in the claim's own commit, and says so, or stores nothing (the worker writes it)."""
    queue = backend.queue
    for n in range(3):
        queue.put(job(n))
    [first] = claim(queue)
    queue.requeue_lapsed(math.inf)  # job 0 waits again, no longer fresh
    assert queue.cancel(job(2).request_id) is CancelResult.WITHDRAWN
    queue.put(job(3))
    assert queue.cancel(job(3).request_id) is CancelResult.WITHDRAWN
    queue.put(job(4))

    def opening(opened: Job, started_at: int) -> StatusEntry:
        return StatusEntry(
            status=Status.PROCESSING,
            request_json=opened.body_json,
            owner=opened.owner,
            timestamp=started_at,
            attempts=1,
            history=(Attempt(started_at=started_at),),
        )

    before = int(time.time() * 1000)
    claims = queue.claim_many(5, holder="w2", lease_seconds=60, opening=opening)
    assert [c.job.request_id for c in claims] == [job(n).request_id for n in (0, 1, 4)]
    again, fresh, last = claims
    assert again.opened_at is None and not again.fresh  # its earlier attempt's status may exist
    for taken in (fresh, last):
        stored = backend.statuses.get(taken.job.request_id)
        if taken.opened_at is None:
            assert stored is None
            continue
        assert before <= taken.opened_at <= int(time.time() * 1000)
        assert stored == opening(taken.job, taken.opened_at)
    assert backend.statuses.get(again.job.request_id) is None
    # Stored under the claim's lease: the finish that follows is fenced by the same token.
    assert backend.finish(fresh.job.request_id, entry(Status.COMPLETED), ttl=60, claim=fresh)
    assert not backend.finish(first.job.request_id, entry(Status.COMPLETED), ttl=60, claim=first)


def test_put_once_stands_for_the_first_request(backend: Backend) -> None:
    queue = backend.queue
    first = Job(request_id="chatreq_first000000000000", body={"a": 1, "b": [1, 2]}, owner="o")
    again = Job(request_id="chatreq_again000000000000", body={"b": [1, 2], "a": 1}, owner="o")
    assert queue.put_once(first, "k1") == Submitted(first.request_id, replayed=False)
    assert queue.put_once(again, "k1") == Submitted(first.request_id, replayed=True)
    assert queue.counts().waiting == 1
    other_owner = Job(request_id="chatreq_other000000000000", body={"a": 1, "b": [1, 2]}, owner="p")
    assert queue.put_once(other_owner, "k1") == Submitted(other_owner.request_id, replayed=False)
    with pytest.raises(IdempotencyConflict) as conflict:
        queue.put_once(job(9), "k1")
    assert conflict.value.request_id == first.request_id
    assert queue.counts().waiting == 2


def test_racing_submits_with_one_key_queue_once(backend: Backend) -> None:
    queue = backend.queue
    copies = [Job(request_id=f"chatreq_race{i:016d}", body={"same": True}, owner="o") for i in range(20)]
    greenlets = [gevent.spawn(queue.put_once, j, "race") for j in copies]
    gevent.joinall(greenlets, raise_error=True)
    assert {g.value.request_id for g in greenlets} == {copies[0].request_id}
    assert queue.counts().waiting == 1


def test_compact_drops_only_finished_jobs(backend: Backend) -> None:
    queue = backend.queue
    for i in range(5):
        queue.put(job(i))
    for taken in claim(queue, limit=3):
        queue.ack(taken)
    assert queue.compact() == 3
    assert queue.counts() == (2, 0)
    assert queue.compact() == 0
    assert [c.job for c in claim(queue, limit=5)] == [job(3), job(4)]


def test_unicode_and_odd_values_round_trip(backend: Backend) -> None:
    odd = Job(
        request_id="chatreq_odd0000000000000",
        owner="o",
        body={"messages": [{"content": "é漢字🙂\u0000\ud800"}], "big": 10**30, "f": 1e-300},
        relay=True,
        submitted_at=7,
    )
    backend.queue.put(odd)
    [taken] = claim(backend.queue)
    assert taken.job == odd


ODD_TEXTS = ('say "hi"', "back\\slash", "{braces, commas}", "NULL", "", "é漢字🙂", "tab\there\nnewline")


def test_odd_texts_survive_the_batched_writes(backend: Backend) -> None:
    """Concurrent status writes and finishes share one statement whose arrays carry every entry:
    quotes, backslashes, braces, commas, the word NULL and empty strings come back as sent."""
    jobs = [
        Job(request_id=f"chatreq_odd{n:021d}", owner="o", body={"messages": [{"content": text}]})
        for n, text in enumerate(ODD_TEXTS)
    ]
    for each in jobs:
        backend.queue.put(each)

    def opening(opened: Job, started_at: int) -> StatusEntry:
        return StatusEntry(
            status=Status.PROCESSING, request_json=opened.body_json, owner="o", timestamp=started_at
        )

    # The claim's own statement carries the openings (where the store writes them).
    held = backend.queue.claim_many(len(jobs), holder="w1", lease_seconds=60, opening=opening)
    for c in held:
        opened = backend.statuses.get(c.job.request_id)
        assert c.opened_at is None or (opened is not None and opened.request_json == c.job.body_json)

    def entry(taken: Claim, status: Status, text: str) -> StatusEntry:
        return StatusEntry(
            status=status,
            request_json=taken.job.body_json,
            owner="o",
            timestamp=1,
            response_json=json.dumps({"text": text}) if status is Status.COMPLETED else None,
            error={"message": text, "type": "t"} if status is Status.PROCESSING else None,
        )

    texts = dict(zip((c.job.request_id for c in held), ODD_TEXTS, strict=True))
    gevent.joinall(
        [
            gevent.spawn(
                backend.statuses.put,
                c.job.request_id,
                entry(c, Status.PROCESSING, texts[c.job.request_id]),
                claim=c,
            )
            for c in held
        ],
        raise_error=True,
    )
    for c in held:
        stored = backend.statuses.get(c.job.request_id)
        assert stored is not None and stored.error == {"message": texts[c.job.request_id], "type": "t"}
    finished = gevent.joinall(
        [
            gevent.spawn(
                backend.finish,
                c.job.request_id,
                entry(c, Status.COMPLETED, texts[c.job.request_id]),
                ttl=60,
                claim=c,
            )
            for c in held
        ],
        raise_error=True,
    )
    assert [g.value for g in finished] == [True] * len(held)
    for c in held:
        stored = backend.statuses.get(c.job.request_id)
        assert stored is not None and stored.request_json == c.job.body_json
        assert json.loads(stored.response_json or "") == {"text": texts[c.job.request_id]}


def test_a_signed_out_session_stays_ended_until_its_expiry(
    backend: Backend, opener: Callable[[Path], Backend], tmp_path: Path
) -> None:
    assert not backend.session_ended("a")
    backend.end_session("a", time.time() + 60)
    backend.end_session("gone", time.time() - 1)
    assert backend.session_ended("a")
    assert not backend.session_ended("b") and not backend.session_ended("gone")
    # Ending it again (two tabs signing out) changes nothing.
    backend.end_session("a", time.time() + 60)
    assert backend.session_ended("a")
    # Every process sees it (the embedded back end: another process on the same DATA_DIR).
    other = opener(tmp_path)
    try:
        assert other.session_ended("a") and not other.session_ended("b")
    finally:
        other.close()


# -- StatusStore -----------------------------------------------------------------------------------


def test_statuses_put_replaces_and_get_misses(backend: Backend) -> None:
    store = backend.statuses
    store.put("a", entry(Status.PROCESSING, attempts=1))
    final = entry(Status.COMPLETED, attempts=1, response_json='{"ok": true}', webhook=WebhookProgress())
    store.put("a", final, ttl=60)
    assert store.get("a") == final
    assert store.get("missing") is None


def test_ttl_expires_entries_and_none_keeps_them(backend: Backend) -> None:
    store = backend.statuses
    store.put("keep", entry(Status.PENDING))
    store.put("short", entry(Status.COMPLETED), ttl=0.2)
    assert store.get("short") is not None
    time.sleep(0.4)
    assert store.get("short") is None
    assert store.purge_expired() == 1
    assert store.purge_expired() == 0
    assert store.get("keep") == entry(Status.PENDING)


def test_update_is_atomic_and_keeps_the_expiry(backend: Backend) -> None:
    store = backend.statuses
    assert store.update("missing", lambda e: e.replace(attempts=9)) is None
    store.put("a", entry(Status.COMPLETED, expires_at=time.time() + 0.5), ttl=0.5)
    progress = WebhookProgress(state=WebhookState.DELIVERED, attempts=1, last_status=200)

    def deliver(current: StatusEntry) -> StatusEntry:
        return current.replace(webhook=progress)

    changed = store.update("a", deliver)
    assert changed is not None and changed.webhook == progress and changed.status is Status.COMPLETED
    assert store.update("a", lambda current: None) == changed  # None: left as it is
    # Concurrent updates of different fields lose nothing.
    greenlets = [
        gevent.spawn(store.update, "a", lambda c, n=n: c.replace(attempts=(c.attempts or 0) + 1))
        for n in range(20)
    ]
    gevent.joinall(greenlets, raise_error=True)
    stored = store.get("a")
    assert stored is not None and stored.attempts == 20 and stored.webhook == progress
    wait_until(lambda: store.get("a") is None, timeout=5)


# -- RequestIndex ----------------------------------------------------------------------------------


def submitted(n: int, owner: str = "o", model: str = "m") -> Job:
    return Job(
        request_id=f"chatreq_{n:020d}", body={"model": model, "n": n}, owner=owner, submitted_at=1_000_000 + n
    )


def listed_ids(backend: Backend, owner: str = "o", **filters: object) -> list[str]:
    return [row.request_id for row in backend.requests.list_for(owner, **filters)]  # type: ignore[arg-type]


def test_the_index_lists_an_owners_requests_newest_first_as_they_change(backend: Backend) -> None:
    for n in range(5):
        backend.queue.put(submitted(n))
    backend.queue.put(submitted(9, owner="someone else"))
    ids = [submitted(n).request_id for n in range(5)]
    assert listed_ids(backend) == ids[::-1]
    [first] = backend.requests.list_for("o", before=(1_000_001, ids[1]), limit=1)
    assert first.request_id == ids[0] and first.status is Status.PENDING and first.model == "m"
    assert first.submitted_at == 1_000_000 and first.attempts == 0
    assert listed_ids(backend, "someone else") == [submitted(9).request_id]

    [running] = claim(backend.queue)
    attempt = Attempt(started_at=2_000_000)
    progress = StatusEntry(
        status=Status.PROCESSING,
        request_json=running.job.body_json,
        owner="o",
        timestamp=2_000_000,
        attempts=1,
        submitted_at=running.job.submitted_at,
        history=(attempt,),
    )
    backend.statuses.put(running.job.request_id, progress, claim=running)
    assert listed_ids(backend, status=Status.PROCESSING) == [ids[0]]
    failed = progress.replace(
        status=Status.ERROR,
        timestamp=2_000_500,
        error={"type": "upstream_error", "attempts": 1},
        history=(attempt.ended("upstream_error", 2_000_400),),
    )
    assert backend.finish(running.job.request_id, failed, ttl=60, claim=running)
    [row] = backend.requests.list_for("o", status=Status.ERROR)
    assert (row.request_id, row.error_type, row.attempts) == (ids[0], "upstream_error", 1)
    assert (row.submitted_at, row.finished_at, row.upstream_ms) == (1_000_000, 2_000_500, 400)
    assert row.duration_ms(now_ms=0) == 1_000_500

    # A waiting job cancelled by the web (its entry does not carry the submit time) keeps its place.
    cancelled = StatusEntry(status=Status.CANCELLED, request_json="{}", owner="o", timestamp=3_000_000)
    assert backend.finish(ids[3], cancelled, ttl=60, withdraw=True)
    assert listed_ids(backend) == ids[::-1]
    [row] = backend.requests.list_for("o", status=Status.CANCELLED)
    assert row.submitted_at == 1_000_003
    assert listed_ids(backend, status=Status.PENDING) == [ids[4], ids[2], ids[1]]
    assert listed_ids(backend, endpoint="/v1/chat/completions") == ids[::-1]
    assert listed_ids(backend, endpoint="/v1/embeddings") == []


def test_the_index_lists_each_endpoint_from_the_request_id(backend: Backend) -> None:
    prefixes = {
        "/v1/chat/completions": "chatreq_",
        "/v1/embeddings": "embreq_",
        "/v1/responses": "respreq_",
        "/v1/completions": "cmplreq_",
    }
    ids = {path: f"{prefix}{n:020d}" for n, (path, prefix) in enumerate(prefixes.items())}
    for n, request_id in enumerate(ids.values()):
        backend.queue.put(
            Job(request_id=request_id, body={"model": "m"}, owner="o", submitted_at=1_000_000 + n)
        )
    newest_first = list(ids.values())[::-1]
    # Waiting (Postgres: jobs without a status yet)...
    assert [(row.request_id, row.endpoint) for row in backend.requests.list_for("o")] == [
        (request_id, path) for path, request_id in reversed(ids.items())
    ]
    for path, request_id in ids.items():
        assert listed_ids(backend, endpoint=path) == [request_id]
        assert listed_ids(backend, endpoint=path, status=Status.PENDING) == [request_id]
    assert listed_ids(backend, endpoint="/v1/unknown") == []
    # ... and with a status.
    for _ in ids:
        [held] = claim(backend.queue)
        final = StatusEntry(
            status=Status.COMPLETED,
            request_json=held.job.body_json,
            owner="o",
            timestamp=2_000_000,
            submitted_at=held.job.submitted_at,
        )
        assert backend.finish(held.job.request_id, final, ttl=60, claim=held)
    assert listed_ids(backend, status=Status.COMPLETED) == newest_first
    for path, request_id in ids.items():
        [row] = backend.requests.list_for("o", endpoint=path)
        assert (row.request_id, row.endpoint, row.status) == (request_id, path, Status.COMPLETED)
        assert listed_ids(backend, endpoint=path, status=Status.PENDING) == []


def test_the_index_pages_through_many_requests_by_cursor(backend: Backend) -> None:
    for n in range(120):
        backend.queue.put(submitted(n, model=f"m{n % 3}"))
    seen: list[str] = []
    before = None
    while True:
        page = backend.requests.list_for("o", before=before, limit=50)
        if not page:
            break
        seen += [row.request_id for row in page]
        before = (page[-1].submitted_at, page[-1].request_id)
    assert seen == [submitted(n).request_id for n in reversed(range(120))]


def test_expired_results_leave_the_index(backend: Backend) -> None:
    backend.queue.put(submitted(1))
    [held] = claim(backend.queue)
    done = StatusEntry(
        status=Status.COMPLETED, request_json="{}", owner="o", timestamp=2_000_000, submitted_at=1_000_001
    )
    assert backend.finish(held.job.request_id, done, ttl=0.3, claim=held)
    assert listed_ids(backend) == [held.job.request_id]
    time.sleep(0.5)
    assert listed_ids(backend) == []
    backend.requests.purge_expired()
    backend.statuses.purge_expired()
    assert listed_ids(backend) == []


def test_the_index_sums_up_an_owners_recent_requests(backend: Backend) -> None:
    minute = 60_000 * 1000
    outcomes = [(Status.COMPLETED, 0, 100), (Status.COMPLETED, 1, 300), (Status.ERROR, 1, 200)]
    for n, (status, offset, ms) in enumerate(outcomes):
        backend.queue.put(submitted(n))
        [held] = claim(backend.queue)
        at = minute + offset * 60_000 + 5
        final = StatusEntry(
            status=status,
            request_json="{}",
            owner="o",
            timestamp=at,
            submitted_at=held.job.submitted_at,
            history=(Attempt(started_at=at - ms, duration_ms=ms, outcome="ok"),),
            webhook=WebhookProgress(),
            error={"type": "upstream_error"} if status is Status.ERROR else None,
        )
        assert backend.finish(held.job.request_id, final, ttl=60, claim=held)
    backend.statuses.update(
        submitted(2).request_id, lambda e: e.replace(webhook=WebhookProgress(state=WebhookState.FAILED))
    )
    summary = backend.requests.summary("o", since=minute)
    assert summary.per_minute == {minute: (1, 0), minute + 60_000: (1, 1)}
    assert (summary.completed, summary.failed) == (2, 1)
    assert sorted(summary.latencies_ms) == [100, 200, 300]
    assert (summary.webhooks_pending, summary.webhooks_failed) == (2, 1)
    assert backend.requests.summary("o", since=minute + 120_000).per_minute == {}
    assert backend.requests.summary("nobody", since=0).latencies_ms == []


# -- Outbox ----------------------------------------------------------------------------------------


def delivery(n: int) -> Delivery:
    return Delivery(request_id=f"chatreq_{n:020d}", owner="o", url=f"https://example.com/{n}", payload="{}")


def test_outbox_owes_until_done_and_recovers_what_a_dead_sender_took(backend: Backend) -> None:
    outbox = backend.outbox
    assert backend.consumer_admitted()
    for i in range(3):
        outbox.owe(delivery(i))
    taken = outbox.take(2, hold=60)
    assert [t.delivery for t in taken] == [delivery(0), delivery(1)]
    assert taken[0].delivery.webhook_id == "msg_chatreq_00000000000000000000"
    outbox.done(taken[0])
    assert [t.delivery for t in outbox.take(10, hold=60)] == [delivery(2)]
    assert outbox.take(10, hold=60) == []
    if backend.previous_holders_gone:
        # The one sender restarted: what it took and did not finish is owed again.
        assert outbox.recover() == 2
        assert {t.delivery for t in outbox.take(10, hold=60)} == {delivery(1), delivery(2)}
    else:
        # Other senders may be alive: what a sender took stays its own while its hold lasts.
        assert outbox.recover() == 0
        assert outbox.take(10, hold=60) == []
    assert outbox.compact() == 1


def test_a_kept_delivery_stays_taken_and_an_abandoned_one_is_taken_up_again(backend: Backend) -> None:
    outbox = backend.outbox
    assert backend.consumer_admitted()
    for i in range(2):
        outbox.owe(delivery(i))
    kept, abandoned = outbox.take(10, hold=0.5)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert outbox.keep([kept], hold=0.5) == {kept.ticket}
        time.sleep(0.1)
    if backend.previous_holders_gone:
        # One sender at a time: nothing is taken from it while it runs, whatever the hold.
        assert outbox.take(10, hold=0.5) == []
    else:
        # The sender that stopped keeping its delivery (it died) lost it to the next one.
        assert [t.delivery for t in outbox.take(10, hold=0.5)] == [abandoned.delivery]
    outbox.done(kept)
    assert outbox.take(10, hold=0.5) == []


# -- signals ---------------------------------------------------------------------------------------


def test_signals_reach_the_other_side(backend: Backend) -> None:
    assert backend.consumer_admitted()
    web = backend.web_signals()
    worker = backend.worker_signals()
    work = gevent.event.Event()
    cancels: list[str] = []
    finals: list[str] = []
    listeners = [
        gevent.spawn(worker.listen, work.set, cancels.append),
        gevent.spawn(web.listen_finals, finals.append),
    ]
    gevent.sleep(0.05)
    try:
        web.work_queued()
        assert work.wait(5)
        web.cancel("chatreq_cancelled000000000")
        wait_until(lambda: cancels == ["chatreq_cancelled000000000"], timeout=5)
        # A final state reached in a web process (a cancel) is announced to the other web
        # processes; one reached in a worker, to every web process.
        web.announce_final("chatreq_from_a_web_process")
        for i in range(30):
            worker.announce_final(f"chatreq_{i:020d}")
        from_workers = [f"chatreq_{i:020d}" for i in range(30)]
        wait_until(lambda: [f for f in finals if f in from_workers] == from_workers, timeout=5)
        sink = web.open_relay("chatreq_streamed0000000000")
        sender = worker.relay("chatreq_streamed0000000000")
        sender.send(b"data: {}\n\n")
        sender.send(b"data: [DONE]\n\n")
        sender.close()
        received = b""
        while (item := sink.next(5)) is not None:
            received += item
        assert received == b"data: {}\n\ndata: [DONE]\n\n"
        sink.close()
        assert web.open_relay("chatreq_quiet000000000000").next(0.05) == b""
    finally:
        gevent.killall(listeners)
        web.close()
        worker.close()


# -- the ceiling and the consumer ------------------------------------------------------------------


def test_concurrency_limit_counts_held_slots(backend: Backend) -> None:
    limit = backend.concurrency_limit(2)
    assert limit.free(0) == 2
    backend.queue.put(job(0))
    backend.queue.put(job(1))
    taken = claim(backend.queue, limit=2)
    first, second = limit.hold(taken[0]), limit.hold(taken[1])
    started = time.monotonic()
    assert limit.free(0.1) == 0 and time.monotonic() - started >= 0.09
    first.release()
    first.release()  # given back exactly once
    assert limit.free(0) == 1
    limit.hold(taken[0])
    # With none free, it waits for one to be given back.
    gevent.spawn_later(0.05, second.release)
    assert limit.free(5) == 1


def test_consumers_are_admitted_as_the_back_end_allows(
    backend: Backend, opener: Callable[[Path], Backend], tmp_path: Path
) -> None:
    assert backend.consumer_admitted()
    assert backend.consumer_admitted()  # asking again keeps the admission
    other = opener(tmp_path)
    try:
        # The embedded back end admits one consumer at a time, and so knows every earlier lease
        # dead once admitted; a networked one admits any number and waits for leases to lapse.
        if backend.previous_holders_gone:
            assert not other.consumer_admitted()
            backend.close()
            assert other.consumer_admitted()
        else:
            assert other.consumer_admitted()
    finally:
        other.close()


# -- health ----------------------------------------------------------------------------------------


def test_heartbeats_reach_every_process_and_the_freshest_counts(
    backend: Backend, opener: Callable[[Path], Backend], tmp_path: Path
) -> None:
    assert backend.probe() is None  # no worker ever beat
    worker = opener(tmp_path)  # another process on the same store
    try:
        worker.beat("w1")
        age = backend.probe()
        assert age is not None and 0 <= age < 1
        time.sleep(0.3)
        older = backend.probe()
        assert older is not None and older >= 0.25
        # Another beat (of this worker, or of another where the back end admits several) counts.
        worker.beat("w2")
        fresh = backend.probe()
        assert fresh is not None and fresh < older
    finally:
        worker.close()


def test_a_store_that_cannot_be_used_fails_the_probe(
    opener: Callable[[Path], Backend], tmp_path: Path
) -> None:
    gone = opener(tmp_path)
    gone.close()
    with pytest.raises(StorageUnavailable):
        gone.probe()


# -- rate limits -----------------------------------------------------------------------------------


class _Gate(RateGate):
    """Admits the request ids it is given; records what the back end shows it."""

    def __init__(self, allowed: set[str], held: list[str] | None = None) -> None:
        self.allowed = allowed
        self.held = held or []
        self.offered: list[str] = []
        self.shared: list[Mapping[str, str] | None] = []

    def begin(self, shared: Mapping[str, str] | None) -> list[str]:
        self.shared.append(shared)
        return self.held

    def admit(self, request_id: str, model: str, body: dict[str, Any]) -> bool:
        self.offered.append(request_id)
        return request_id in self.allowed

    def end(self) -> tuple[dict[str, str], dict[str, float]]:
        refused = {str(m) for rid in self.offered if rid not in self.allowed for m in [_model_of(rid)]}
        until = time.time() + 30
        return {"m-a": '{"note": 1}'}, {model: until for model in [*refused, *self.held]}


_MODELS = {1: "m-a", 2: "m-b", 3: "m-a", 4: "m-b", 5: "m-c", 6: "m-a"}


def _model_of(request_id: str) -> str:
    return _MODELS[int(request_id.removeprefix("chatreq_"))]


def model_job(n: int) -> Job:
    return Job(request_id=f"chatreq_{n:020d}", body={"model": _MODELS[n], "n": n}, owner="o")


def test_a_gate_passes_over_held_back_models_keeping_order_within_each(backend: Backend) -> None:
    for n in _MODELS:
        backend.queue.put(model_job(n))
    ids = {n: model_job(n).request_id for n in _MODELS}
    # m-a's first job is refused: its later ones are not even offered, though the gate would
    # take them; m-b and m-c go; m-c is held back from the start.
    gate = _Gate({ids[2], ids[3], ids[4], ids[5], ids[6]}, held=["m-c"])
    claims = backend.queue.claim_many(10, holder="w1", lease_seconds=60, gate=gate)
    assert [c.job.request_id for c in claims] == [ids[2], ids[4]]
    assert gate.offered == [ids[1], ids[2], ids[4]]
    # Waiting jobs of a held-back model show until when; the others do not.
    for n in (1, 3, 5):
        found = backend.queue.find(ids[n])
        assert found is not None and found.position is not None
        assert found.throttled_until is not None and found.throttled_until > time.time() * 1000 + 20_000
    assert backend.queue.counts() == (4, 2)
    # The models held back, for the dashboard: the refused one and the one held from the start.
    held = backend.queue.throttles()
    assert set(held) == {"m-a", "m-c"} and all(until > time.time() + 20 for until in held.values())
    # Without a gate, the oldest waiting jobs, whatever their model.
    assert [c.job.request_id for c in claim(backend.queue, 2)] == [ids[1], ids[3]]


def test_a_gate_that_holds_every_model_claims_nothing(backend: Backend) -> None:
    backend.queue.put(model_job(1))
    gate = _Gate({model_job(1).request_id}, held=[ALL_MODELS])
    assert backend.queue.claim_many(5, holder="w1", lease_seconds=60, gate=gate) == []
    found = backend.queue.find(model_job(1).request_id)
    assert found is not None and found.throttled_until is not None
    assert set(backend.queue.throttles()) == {ALL_MODELS}


def test_rate_state_is_shared_by_every_worker_of_a_shared_back_end(
    backend: Backend, opener: Callable[[Path], Backend], tmp_path: Path
) -> None:
    backend.queue.put(model_job(1))
    first = _Gate({model_job(1).request_id})
    backend.queue.claim_many(1, holder="w1", lease_seconds=60, gate=first)
    seen: list[Mapping[str, str] | None] = []

    def change(shared: Mapping[str, str] | None) -> dict[str, str]:
        seen.append(shared)
        return {"m-a": '{"note": 2}'}

    other = opener(tmp_path)  # another worker's process
    try:
        other.queue.share_rates(["m-a", "m-b"], change)
        second = _Gate(set())
        other.queue.claim_many(1, holder="w2", lease_seconds=60, gate=second)
    finally:
        other.close()
    if first.shared == [None]:
        # One worker per store: the state lives in its process, nothing is stored.
        assert seen == [None] and second.shared == [None]
    else:
        assert first.shared == [{}]
        assert seen == [{"m-a": '{"note": 1}'}]
        assert second.shared == [{"m-a": '{"note": 2}'}]
