"""The HTTP API in-process through webtest, on the real SQLite/diskcache storage."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webtest import TestApp

from conftest import API_KEY, body
from llm_proxy.api.app import ApiSettings, create_app
from llm_proxy.api.auth import KeyChecker
from llm_proxy.api.http import SECURITY_HEADERS
from llm_proxy.domain.job import Job
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.ratelimit.book import Ceiling, RatePolicy
from llm_proxy.services.health import HealthMonitor
from llm_proxy.storage.base import Claim, StorageUnavailable
from llm_proxy.storage.factory import open_backend
from llm_proxy.storage.sqlite.queue import PersistJobQueue
from llm_proxy.storage.sqlite.statuses import DiskcacheStatusStore
from llm_proxy.worker.pacing import Limiter
from llm_proxy.worker.runner import entry_for
from support.web import OTHER_KEY, InProcessWeb, claim_one

Harness = InProcessWeb


@pytest.fixture(params=["embedded", "postgres"])
def make_web(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """The API on each back end."""
    url = request.getfixturevalue("database_url") if request.param == "postgres" else None
    made: list[Harness] = []

    def make(**settings: Any) -> Harness:
        made.append(Harness(tmp_path / f"data{len(made)}", database_url=url, **settings))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def h(make_web: Callable[..., Harness]) -> Harness:
    return make_web()


def assert_error(reply: Any, status: int, kind: str) -> dict[str, Any]:
    assert reply.status_int == status
    assert reply.content_type == "application/json"
    error = reply.json["error"]
    assert error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def test_health_needs_no_key(h: Harness) -> None:
    reply = h.app.get("/health")
    assert reply.json == {"status": "ok", "problems": []}


def test_health_reports_a_silent_worker_and_an_unusable_store_with_503(h: Harness) -> None:
    def app_on(probe: Callable[[], float | None], clock: Callable[[], float]) -> TestApp:
        monitor = HealthMonitor(probe, worker_silence=60, cache_seconds=0, clock=clock)
        return TestApp(
            create_app(
                service=h.service,
                keys=KeyChecker([API_KEY]),
                settings=ApiSettings(max_body_bytes=16384),
                render_metrics=lambda: b"",
                health=monitor.check,
            )
        )

    now = [0.0]
    app = app_on(h.backend.probe, lambda: now[0])
    assert app.get("/health").json == {"status": "ok", "problems": []}  # the grace period
    now[0] = 61
    silent = app.get("/health", status=503)
    assert silent.json["status"] == "unavailable"
    assert [p["check"] for p in silent.json["problems"]] == ["worker"]
    assert silent.headers["Cache-Control"] == "no-store"
    h.backend.beat("a-worker")
    assert app.get("/health").json == {"status": "ok", "problems": []}
    # A store that cannot be used (here: one closed under the web's feet).
    closed = open_backend(data_dir=h.data_dir, database_url=h.database_url)
    closed.close()
    broken = app_on(closed.probe, lambda: now[0]).get("/health", status=503)
    assert [p["check"] for p in broken.json["problems"]] == ["store"]


def test_submit_answers_202_after_queueing_durably(make_web: Callable[..., Harness]) -> None:
    h = make_web()
    reply = h.submit(body("one"), status=202)
    accepted = reply.json
    assert set(accepted) == {"request_id", "status", "queue_position", "active_requests"}
    assert accepted["status"] == "pending"
    assert accepted["queue_position"] == 1
    assert accepted["active_requests"] == 0
    assert reply.headers["Location"] == f"/v1/chat/completions/{accepted['request_id']}"
    assert h.nudges == 1
    # Another process opening the same store sees the job: it is stored, not in memory.
    queue = make_web().queue if h.database_url else PersistJobQueue(h.data_dir / "queue")
    claim = claim_one(queue)
    assert claim is not None and claim.job.request_id == accepted["request_id"]
    assert claim.job.body == body("one")
    if not h.database_url:
        queue.close()


def test_queue_positions_and_active_requests(h: Harness) -> None:
    ids = [h.submit(body(str(i)), status=202).json["request_id"] for i in range(3)]
    assert h.submit(status=202).json["queue_position"] == 4
    claim = claim_one(h.queue)
    assert claim is not None
    h.statuses.put(claim.job.request_id, entry_for(claim.job, Status.PROCESSING))
    fourth = h.submit(status=202).json
    assert fourth["queue_position"] == 4 and fourth["active_requests"] == 1
    assert h.get(ids[2]).json["queue_position"] == 2
    processing = h.get(ids[0]).json
    assert processing["status"] == "processing" and "queue_position" not in processing


def test_status_shapes_for_each_state(h: Harness) -> None:
    rid = h.submit(body("hi", webhookUrl="https://example.com/h"), status=202).json["request_id"]
    pending = h.get(rid).json
    assert pending["status"] == "pending"
    assert pending["request"] == body("hi", webhookUrl="https://example.com/h")
    assert pending["queue_position"] == 1
    assert isinstance(pending["timestamp"], int)
    assert "owner" not in pending and "ticket" not in pending

    claim = claim_one(h.queue)
    assert isinstance(claim, Claim)
    h.statuses.put(
        rid,
        entry_for(claim.job, Status.COMPLETED, response_json='{"id": "x", "choices": []}', attempts=1),
        ttl=60,
    )
    completed = h.get(rid).json
    assert completed["status"] == "completed" and completed["response"] == {"id": "x", "choices": []}

    h.statuses.put(
        rid,
        entry_for(claim.job, Status.ERROR, error={"message": "m", "type": "timeout", "attempts": 4}),
        ttl=60,
    )
    failed = h.get(rid).json
    assert failed["status"] == "error"
    assert failed["error"] == {"message": "m", "type": "timeout", "attempts": 4}


def test_unknown_malformed_and_foreign_ids_are_not_found(h: Harness) -> None:
    rid = h.submit(status=202).json["request_id"]
    for request_id in ["chatreq_doesnotexist000000000", "a" * 200, "..%2F..%2Fetc", "x"]:
        error = assert_error(h.get(request_id), 404, "request_not_found")
        assert error["message"] == "Request not found"
    assert_error(h.get(rid, key=OTHER_KEY), 404, "request_not_found")
    assert h.get(rid).status_int == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong-key-000000"},
        {"Authorization": "Bearer wrong-key-000000"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic " + API_KEY},
    ],
)
def test_missing_or_wrong_key_is_401(h: Harness, headers: dict[str, str]) -> None:
    submit = h.app.post("/v1/chat/completions", json.dumps(body()), headers=headers, status="*")
    assert_error(submit, 401, "authentication_error")
    assert_error(
        h.app.get("/v1/chat/completions/chatreq_abcdefghijklmnop", headers=headers, status="*"),
        401,
        "authentication_error",
    )
    assert h.queue.counts().waiting == 0


def test_bearer_key_is_accepted(h: Harness) -> None:
    reply = h.app.post(
        "/v1/chat/completions", json.dumps(body()), headers={"Authorization": f"Bearer {API_KEY}"}, status="*"
    )
    assert reply.status_int == 202


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'"text"',
        b"null",
        b'{"model": NaN}',
        b'{"x": 1e999}',
        b"[" * 3000,
        b"\xff\xfe",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 5000 + b"}",
    ],
)
def test_bodies_that_are_not_a_json_object_are_400(h: Harness, raw: bytes) -> None:
    reply = h.submit(raw)
    error = assert_error(reply, 400, "validation_error")
    assert error["message"] == "Invalid request body"
    assert error["details"] and all({"path", "message"} <= set(d) for d in error["details"])
    assert h.queue.counts().waiting == 0


def test_validation_reports_each_problem_with_its_path(h: Harness) -> None:
    reply = h.submit(
        {
            "model": "",
            "messages": [{"role": "robot", "content": 5}],
            "temperature": 9,
            "webhookUrl": "ftp://example.com",
        }
    )
    error = assert_error(reply, 400, "validation_error")
    paths = sorted(d["path"] for d in error["details"])
    assert paths == ["messages.0.content", "messages.0.role", "model", "temperature", "webhookUrl"]


def test_body_over_the_limit_is_413(h: Harness) -> None:
    reply = h.submit(body("x" * 20000))
    assert_error(reply, 413, "request_too_large")
    assert h.queue.counts().waiting == 0


def test_full_queue_is_429_with_retry_after(make_web: Callable[..., Harness]) -> None:
    harness = make_web(max_queue=2)
    harness.submit(status=202)
    harness.submit(status=202)
    reply = harness.submit()
    assert_error(reply, 429, "queue_full")
    assert int(reply.headers["Retry-After"]) > 0
    assert harness.queue.counts().waiting == 2


class BrokenQueue(PersistJobQueue):
    """A real queue whose disk stops accepting writes (what a full disk looks like to us)."""

    def put(self, job: Job, *, max_waiting: int | None = None) -> int:
        raise StorageUnavailable("database or disk is full")


def test_storage_failure_is_503_never_202(tmp_path: Path) -> None:
    queue = BrokenQueue(tmp_path / "q")
    web = Harness(tmp_path / "data", queue=queue)
    reply = web.submit(body())
    assert_error(reply, 503, "service_unavailable")
    assert int(reply.headers["Retry-After"]) > 0
    assert queue.counts().waiting == 0
    web.close()


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/nope", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/health", 405),
    ],
)
def test_route_errors_are_json(h: Harness, method: str, path: str, status: int) -> None:
    reply = h.app.request(path, method=method, headers={"X-API-Key": API_KEY}, status="*")
    assert reply.status_int == status
    assert reply.content_type == "application/json"
    assert set(reply.json["error"]) >= {"message", "type"}


def test_unhandled_exception_is_json_500_with_headers(tmp_path: Path) -> None:
    class Exploding(DiskcacheStatusStore):
        def get(self, request_id: str) -> StatusEntry | None:
            raise RuntimeError("boom")

    web = Harness(tmp_path / "data", statuses=Exploding(tmp_path / "s2"))
    reply = web.app.get(
        "/v1/chat/completions/chatreq_abcdefghijklmnopqr", headers={"X-API-Key": API_KEY}, status="*"
    )
    assert_error(reply, 500, "internal_error")
    assert "boom" not in reply.text and "Traceback" not in reply.text
    assert reply.headers["X-Frame-Options"] == "SAMEORIGIN"


def test_security_headers_on_success_and_error(h: Harness) -> None:
    for reply in [h.app.get("/health"), h.app.get("/nope", status="*"), h.submit(b"{")]:
        for name, value in SECURITY_HEADERS:
            assert reply.headers[name] == value
        assert "Server" not in reply.headers and "X-Powered-By" not in reply.headers


def test_request_ids_are_unguessable(h: Harness) -> None:
    ids = {h.submit(status=202).json["request_id"] for _ in range(50)}
    assert len(ids) == 50
    for request_id in ids:
        token = request_id.removeprefix("chatreq_")
        assert len(token) * 6 >= 128


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bodies_get_a_json_4xx_and_store_nothing(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        harness = Harness(Path(tmp))
        reply = harness.submit(raw)
        if reply.status_int != 202:
            assert 400 <= reply.status_int < 500
            assert reply.json["error"]["type"] == "validation_error"
            assert harness.queue.counts().waiting == 0
        harness.close()


@pytest.mark.parametrize("wait", ["abc", "-1", "nan", "inf", "1e999"])
def test_bad_wait_is_400(h: Harness, wait: str) -> None:
    rid = h.submit(status=202).json["request_id"]
    reply = h.app.get(f"/v1/chat/completions/{rid}?wait={wait}", headers={"X-API-Key": API_KEY}, status="*")
    error = assert_error(reply, 400, "invalid_request_error")
    assert error["param"] == "wait"


def test_pending_answers_carry_retry_after_and_final_ones_do_not(h: Harness) -> None:
    rid = h.submit(status=202).json["request_id"]
    assert h.get(rid).headers["Retry-After"] == "1"
    claim = claim_one(h.queue)
    assert claim is not None
    h.statuses.put(rid, entry_for(claim.job, Status.COMPLETED, response_json="{}", attempts=1), ttl=60)
    assert "Retry-After" not in h.get(rid).headers


def test_long_poll_returns_when_the_worker_announces_the_result(make_web: Callable[..., Harness]) -> None:
    h = make_web(sync_wait_max=60)
    rid = h.submit(status=202).json["request_id"]

    def finish() -> None:
        gevent.sleep(0.2)
        claim = claim_one(h.queue)
        assert claim is not None
        h.statuses.put(rid, entry_for(claim.job, Status.COMPLETED, response_json='{"ok": 1}'), ttl=60)
        h.waiters.wake(rid)

    gevent.spawn(finish)
    # Without the wake-up this would hold for the full 60 s.
    with gevent.Timeout(15):
        reply = h.app.get(f"/v1/chat/completions/{rid}?wait=60", headers={"X-API-Key": API_KEY})
    assert reply.json["status"] == "completed" and reply.json["response"] == {"ok": 1}
    assert len(h.waiters) == 0


def test_long_poll_is_capped_and_answers_the_current_status(make_web: Callable[..., Harness]) -> None:
    h = make_web(sync_wait_max=0.2)
    rid = h.submit(status=202).json["request_id"]
    with gevent.Timeout(15):
        reply = h.app.get(f"/v1/chat/completions/{rid}?wait=3600", headers={"X-API-Key": API_KEY})
    assert reply.json["status"] == "pending" and reply.headers["Retry-After"] == "1"


def test_idempotency_key_replays_the_original_request(h: Harness) -> None:
    first = h.submit(body("once"), headers={"Idempotency-Key": "order-42"}, status=202)
    again = h.submit(body("once"), headers={"Idempotency-Key": "order-42"}, status=202)
    assert again.json["request_id"] == first.json["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert h.queue.counts().waiting == 1 and h.nudges == 1
    conflict = h.submit(body("changed"), headers={"Idempotency-Key": "order-42"})
    error = assert_error(conflict, 422, "idempotency_error")
    assert error["request_id"] == first.json["request_id"]
    # Keys belong to the API key that used them.
    other = h.submit(body("once"), key=OTHER_KEY, headers={"Idempotency-Key": "order-42"}, status=202)
    assert other.json["request_id"] != first.json["request_id"]


@pytest.mark.parametrize("key", ["", " leading-space", "x" * 256, "tab\\there", "é"])
def test_malformed_idempotency_keys_are_400(h: Harness, key: str) -> None:
    reply = h.app.post(
        "/v1/chat/completions",
        json.dumps(body()),
        headers={"X-API-Key": API_KEY, "Idempotency-Key": key.replace("\\t", "\t")},
        status="*",
        expect_errors=True,
    )
    error = assert_error(reply, 400, "invalid_request_error")
    assert error["param"] == "Idempotency-Key"


def test_headers_that_are_not_utf8_are_refused_not_crashed(h: Harness) -> None:
    # WSGI hands headers over as latin-1; bytes that are not UTF-8 must be a plain 401/400.
    for name in ["HTTP_X_API_KEY", "HTTP_AUTHORIZATION"]:
        reply = h.app.post(
            "/v1/chat/completions", json.dumps(body()), extra_environ={name: "\xe9\xff"}, status="*"
        )
        assert_error(reply, 401, "authentication_error")
    reply = h.app.post(
        "/v1/chat/completions",
        json.dumps(body()),
        headers={"X-API-Key": API_KEY},
        extra_environ={"HTTP_PREFER": "wait=\xe9", "HTTP_IDEMPOTENCY_KEY": "ok-key"},
        status="*",
    )
    assert reply.status_int == 202


def test_cancelling_a_waiting_request_ends_it_at_once_and_for_good(h: Harness) -> None:
    rid = h.submit(body("never sent", webhookUrl="https://example.com/hook"), status=202).json["request_id"]
    other = h.app.delete(f"/v1/chat/completions/{rid}", headers={"X-API-Key": OTHER_KEY}, status="*")
    assert other.status_int == 404  # another key's request is not found
    reply = h.app.delete(f"/v1/chat/completions/{rid}", headers={"X-API-Key": API_KEY}, status="*")
    assert reply.status_int == 200 and reply.json["status"] == "cancelled"
    assert reply.json["webhook"] == {"state": "pending", "attempts": 0}
    # Out of the queue and final, in the same step: no worker can take it, its status stays.
    assert claim_one(h.queue) is None and h.queue.counts() == (0, 0)
    h.queue.compact()
    assert h.get(rid).json["status"] == "cancelled"
    again = h.app.delete(f"/v1/chat/completions/{rid}", headers={"X-API-Key": API_KEY}, status="*")
    assert again.status_int == 200 and again.json["status"] == "cancelled"
    taken = h.backend.outbox.take(10, hold=60)
    assert [t.delivery.request_id for t in taken] == [rid]


def test_a_wait_that_runs_out_answers_202_with_the_requests_real_status(
    make_web: Callable[..., Harness],
) -> None:
    h = make_web(sync_wait_max=5)
    taken: list[str] = []

    def a_worker_takes_it() -> None:
        gevent.sleep(0.05)
        claim = claim_one(h.queue)
        assert claim is not None
        h.statuses.put(claim.job.request_id, entry_for(claim.job, Status.PROCESSING, attempts=1))
        taken.append(claim.job.request_id)

    gevent.spawn(a_worker_takes_it)
    reply = h.submit(body("slow"), headers={"Prefer": "wait=0.5"}, status=202)
    accepted = reply.json
    assert taken == [accepted["request_id"]]
    # What GET says too, not the "pending" at place 0 of a request that was never looked at.
    assert accepted["status"] == h.get(accepted["request_id"]).json["status"] == "processing"
    assert accepted["queue_position"] == 0 and accepted["active_requests"] == 1
    assert reply.headers["Retry-After"] == "1"


def test_an_error_status_has_top_level_attempts(h: Harness) -> None:
    rid = h.submit(status=202).json["request_id"]
    claim = claim_one(h.queue)
    assert claim is not None
    # As the worker stores a failure: the count in the error only.
    failed = entry_for(
        claim.job, Status.ERROR, error={"message": "m", "type": "upstream_error", "attempts": 3}
    )
    h.statuses.put(rid, failed, ttl=60)
    shown = h.get(rid).json
    assert shown["status"] == "error" and shown["attempts"] == 3 and shown["error"]["attempts"] == 3


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://[::1]/hook"])
def test_a_loopback_webhook_is_refused_naming_the_setting_that_allows_it(
    make_web: Callable[..., Harness], url: str
) -> None:
    refused = assert_error(make_web().submit(body(webhookUrl=url)), 400, "validation_error")
    [detail] = refused["details"]
    assert detail["path"] == "webhookUrl" and "WEBHOOK_ALLOW_PRIVATE=true" in detail["message"]
    assert make_web(webhook_allow_private=True).submit(body(webhookUrl=url)).status_int == 202


HOSTILE_SUBMITS = [
    ("/v1/chat/completions", body(model="a\u0000"), "model"),
    ("/v1/chat/completions", body(model="line\nbreak"), "model"),
    (
        "/v1/chat/completions",
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
        b'"max_tokens": 1' + b"0" * 400 + b"}",
        "max_tokens",
    ),
    ("/v1/chat/completions", body(max_completion_tokens=2**31), "max_completion_tokens"),
    ("/v1/chat/completions", body(n=2**40), "n"),
    ("/v1/embeddings", {"model": "a\u0000", "input": "x"}, "model"),
    ("/v1/responses", {"model": "a\u0000", "input": "x"}, "model"),
    ("/v1/responses", {"model": "m", "input": "x", "max_output_tokens": 10**30}, "max_output_tokens"),
    ("/v1/completions", {"model": "\u0000", "prompt": "x"}, "model"),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 10**30}, "max_tokens"),
]


@pytest.mark.parametrize(("path", "payload", "field"), HOSTILE_SUBMITS)
def test_control_characters_in_model_and_huge_token_counts_are_400(
    h: Harness, path: str, payload: Any, field: str
) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload)
    reply = h.app.post(
        path, data, headers={"X-API-Key": API_KEY}, content_type="application/json", status="*"
    )
    error = assert_error(reply, 400, "validation_error")
    assert [d["path"] for d in error["details"]] == [field]
    assert h.queue.counts().waiting == 0
    # The store still takes every other submit.
    assert h.submit(body()).status_int == 202


def test_a_queued_job_with_a_huge_max_tokens_is_claimed_not_crash_looping(h: Harness) -> None:
    # Queued before validation refused it (or by another version): the claim's gate must not fail.
    huge = Job(request_id="chatreq_" + "h" * 24, body=body(max_tokens=10**400), owner="o")
    h.queue.put(huge)
    gate = Limiter(RatePolicy(per_model={"gpt-test": Ceiling(tpm=1000)}), h.queue)
    claims = h.queue.claim_many(5, holder="w1", lease_seconds=60, gate=gate)
    assert [c.job.request_id for c in claims] == [huge.request_id]


def test_rate_state_of_models_with_nothing_to_share_is_not_kept(h: Harness) -> None:
    now = [1_700_000_000.0]
    gate = Limiter(RatePolicy(), h.queue, clock=lambda: now[0])
    for n in range(3):
        h.queue.put(Job(request_id=f"chatreq_{n:024d}", body=body(model=f"random-{n}"), owner="o"))
    assert len(h.queue.claim_many(5, holder="w1", lease_seconds=60, gate=gate)) == 3
    seen: list[Any] = []

    def peek(shared: Any) -> dict[str, str]:
        seen.append(None if shared is None else dict(shared))
        return {}

    models = [f"random-{n}" for n in range(3)]
    h.queue.share_rates(models, peek)
    # A window later, the next claim writes them empty and the store forgets them.
    now[0] += 62
    assert h.queue.claim_many(0, holder="w1", lease_seconds=60, gate=gate) == []
    h.queue.share_rates(models, peek)
    if seen[0] is not None:  # a shared store: the rows went
        assert set(seen[0]) == set(models)
        assert seen[1] == {}


SDK_HEADERS = {"X-Stainless-Lang": "python", "X-Stainless-Package-Version": "1.0.0"}


def test_an_openai_sdk_request_waits_and_never_gets_a_202_it_cannot_read(
    make_web: Callable[..., Harness],
) -> None:
    h = make_web(sync_wait_max=0.2)
    reply = h.submit(body(), headers=SDK_HEADERS)
    error = assert_error(reply, 504, "wait_timeout")
    rid = reply.headers["X-Request-Id"]
    assert reply.headers["x-should-retry"] == "false"
    assert rid in error["message"] and f"GET /v1/chat/completions/{rid}" in error["message"]
    assert error["request_id"] == rid and error["code"] == "wait_timeout"
    # It goes on: still queued, as the message says.
    assert h.get(rid).json["status"] == "pending"
    # RFC 7240's respond-async asks for the 202 explicitly, at once or after its wait.
    assert h.submit(body(), headers={**SDK_HEADERS, "Prefer": "respond-async"}).status_int == 202
    assert h.submit(body(), headers={**SDK_HEADERS, "Prefer": "respond-async, wait=0.1"}).status_int == 202
    # Any other client keeps the 202 by default, and after a wait it asked for.
    assert h.submit(body()).status_int == 202
    assert h.submit(body(), headers={"Prefer": "wait=0.1"}).status_int == 202
