"""The Postgres back end with real processes: several web and worker processes on one database,
as several dynos would run them, against a real PostgreSQL server that is killed and restarted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import openai
import pytest
import requests

from conftest import API_KEY, FakeUpstream, Receiver, Service, body, wait_until
from support.postgres import PostgresServer

MakeService = Callable[..., Service]


@pytest.fixture
def dyno(make_service: MakeService, database_url: str) -> Callable[..., Service]:
    """A web dyno (web process plus its embedded worker) on the shared database, with a DATA_DIR
    of its own, as on Heroku."""

    def make(**env: str) -> Service:
        return make_service(DATABASE_URL=database_url, LEASE_TIMEOUT="3", **env)

    return make


def sqlite_files(service: Service) -> list[str]:
    """SQLite databases under DATA_DIR, by their header (the metrics' own .db files are not)."""
    found = []
    for path in service.data_dir.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                if handle.read(16) == b"SQLite format 3\x00":
                    found.append(str(path))
    return found


def test_every_feature_works_across_web_processes(
    dyno: Callable[..., Service], fake_upstream: FakeUpstream
) -> None:
    one, two = dyno(MAX_CONCURRENT="4"), dyno(MAX_CONCURRENT="4", EMBEDDED_WORKER="false")
    fake_upstream.reset()
    # Submitted on one, read and long-polled on the other.
    rid = one.submit(body("across", x_fake={"key": "pg-across", "delay": 0.5})).json()["request_id"]
    polled = requests.get(
        f"{two.url}/v1/chat/completions/{rid}?wait=20", headers=two.headers(), timeout=30
    ).json()
    assert polled["status"] == "completed"
    assert polled["response"]["choices"][0]["message"]["content"] == "echo: across"
    # Wait mode and streamed wait mode through the second web process, whose own worker is off.
    client = openai.OpenAI(
        base_url=two.url + "/v1", api_key=API_KEY, default_headers={"Prefer": "wait"}, max_retries=0
    )
    reply = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "sdk"}])
    assert reply.choices[0].message.content == "echo: sdk"
    streamed = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "streamed words"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == (
        "echo: streamed words"
    )
    # Replayed by Idempotency-Key on the other one.
    headers = {**one.headers(), "Idempotency-Key": "pg-key-1"}
    first = requests.post(f"{one.url}/v1/chat/completions", json=body("once"), headers=headers, timeout=10)
    again = requests.post(f"{two.url}/v1/chat/completions", json=body("once"), headers=headers, timeout=10)
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    # Cancelled on the other one while it runs.
    slow = one.submit(body(x_fake={"key": "pg-cancel", "delay": 30})).json()["request_id"]
    wait_until(lambda: fake_upstream.stats()["by_key"].get("pg-cancel") == 1, timeout=10)
    cancelled = requests.delete(f"{two.url}/v1/chat/completions/{slow}", headers=two.headers(), timeout=15)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert one.status(slow).json()["status"] == "cancelled"
    # With DATABASE_URL nothing is written to SQLite files.
    assert sqlite_files(one) == [] and sqlite_files(two) == []


def test_the_ceiling_holds_across_worker_processes(
    dyno: Callable[..., Service], fake_upstream: FakeUpstream
) -> None:
    first = dyno(MAX_CONCURRENT="3")
    second = dyno(MAX_CONCURRENT="3")
    extra = second.start("worker")
    fake_upstream.reset()
    ids = [
        (first if i % 2 else second)
        .submit(body(f"c{i}", x_fake={"key": f"pg-c{i}", "delay": 0.3}))
        .json()["request_id"]
        for i in range(24)
    ]
    finals = [first.wait_final(rid, timeout=60) for rid in ids]
    assert all(f["status"] == "completed" for f in finals)
    stats = fake_upstream.stats()
    assert stats["peak"] == 3
    assert extra.poll() is None


def test_a_killed_worker_s_calls_are_taken_over(
    dyno: Callable[..., Service], fake_upstream: FakeUpstream
) -> None:
    # The web dyno's own worker is off: the only worker is the one killed, then another starts.
    web = dyno(MAX_CONCURRENT="4", EMBEDDED_WORKER="false")
    doomed = web.start("worker")
    fake_upstream.reset()
    ids = [
        web.submit(body(f"k{i}", x_fake={"key": f"pg-k{i}", "delay": 30, "slow_times": 1})).json()[
            "request_id"
        ]
        for i in range(4)
    ]
    wait_until(
        lambda: all(fake_upstream.stats()["by_key"].get(f"pg-k{i}") == 1 for i in range(4)), timeout=15
    )
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    killed_at = time.monotonic()
    web.start("worker")
    finals = [web.wait_final(rid, timeout=30) for rid in ids]
    assert all(f["status"] == "completed" for f in finals)
    # Within LEASE_TIMEOUT (3 s) plus a few seconds.
    assert time.monotonic() - killed_at < 3 + 8
    assert all(fake_upstream.stats()["by_key"][f"pg-k{i}"] == 2 for i in range(4))
    assert all(f["attempts"] == 2 for f in finals)


def test_a_killed_worker_s_webhook_delivery_is_taken_up_by_another(
    dyno: Callable[..., Service], receiver: Receiver
) -> None:
    web = dyno(EMBEDDED_WORKER="false", WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_RETRY_BASE="2")
    doomed = web.start("worker")
    name = f"pg-hook-{time.time_ns()}"
    rid = web.submit(body("hook", webhookUrl=receiver.url(f"/fail/1/{name}"))).json()["request_id"]
    # Its first attempt failed; the next one is due in about 2 s, and the worker dies meanwhile.
    wait_until(lambda: len(receiver.received(name)) == 1, timeout=20)
    # Stored as failed (the receiver answers before the worker stores what it answered).
    wait_until(lambda: (web.status(rid).json().get("webhook") or {}).get("attempts") == 1, timeout=10)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    killed_at = time.monotonic()
    web.start("worker")
    wait_until(lambda: (web.status(rid).json().get("webhook") or {}).get("state") == "delivered", timeout=30)
    # Within LEASE_TIMEOUT (3 s) plus a few seconds, with the same webhook-id for the receiver.
    assert time.monotonic() - killed_at < 3 + 8
    posts = receiver.received(name)
    assert len(posts) == 2 and len({p["headers"]["webhook-id"] for p in posts}) == 1
    assert web.status(rid).json()["webhook"]["attempts"] == 2


def test_a_stopped_database_is_refused_quickly_and_recovered_from(
    dyno: Callable[..., Service], fake_upstream: FakeUpstream, postgres_server: PostgresServer
) -> None:
    web = dyno(MAX_CONCURRENT="2")
    fake_upstream.reset()
    before = [
        web.submit(body(f"b{i}", x_fake={"key": f"pg-b{i}", "delay": 1})).json()["request_id"]
        for i in range(3)
    ]
    postgres_server.stop("immediate")
    try:
        started = time.monotonic()
        refused = web.submit(body("during"))
        assert time.monotonic() - started < 5
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        status = web.status(before[0])
        assert status.status_code == 503
    finally:
        postgres_server.start()
    # Everything recovers by itself; nothing accepted is lost.
    after = wait_until(lambda: web.submit(body("after")).status_code == 202 or None, timeout=30, interval=0.5)
    assert after
    finals = [web.wait_final(rid, timeout=60) for rid in before]
    assert all(f["status"] == "completed" for f in finals)


def test_a_bad_database_url_stops_the_start_without_showing_the_password(
    make_service: MakeService, postgres_server: PostgresServer | None
) -> None:
    for url in ("mysql://user:hunter2secret@127.0.0.1/db", "postgres://user:hunter2secret@127.0.0.1:1/db"):
        service = make_service(start=False, DATABASE_URL=url)
        for kind in ("web", "worker"):
            process = service.start(kind, wait=False)
            assert process.wait(timeout=60) == 2
        log = service.log()
        assert "DATABASE_URL" in log and "hunter2secret" not in log and "Traceback" not in log


def test_the_generated_key_is_shared_by_every_process(make_service: MakeService, database_url: str) -> None:
    one = make_service(start=False, API_KEY="", DATABASE_URL=database_url)
    two = make_service(start=False, API_KEY="", DATABASE_URL=database_url)
    one.start(wait=False)
    two.start(wait=False)
    wait_until(one.healthy, timeout=30)
    wait_until(two.healthy, timeout=30)
    printed = [line for s in (one, two) for line in s.log().splitlines() if "API key: " in line]
    assert len(printed) == 1  # printed once, by the process that created it
    key = printed[0].split("API key: ")[1].strip()
    for service in (one, two):
        assert service.submit(body(), key=key).status_code == 202
        assert service.submit(body(), key="sk-proxy-wrong-key").status_code == 401
