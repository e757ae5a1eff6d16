"""Rate limits end to end, on both back ends: the real service against the fake upstream enforcing
RPM and TPM per model as OpenAI does (tests/support/fake_upstream.py, ``/_limits``). Each test uses
models of its own, so the session's one fake upstream needs no reset between them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import requests

from conftest import FakeUpstream, Service, body, wait_until

MakeService = Callable[..., Service]


def new_model(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def set_limits(upstream: FakeUpstream, limits: dict[str, dict[str, int]]) -> None:
    requests.post(f"http://127.0.0.1:{upstream.port}/_limits", json=limits, timeout=5).raise_for_status()


def drain(upstream: FakeUpstream, model: str, calls: int) -> None:
    """Use up the model's request budget from another client of the same key."""
    for _ in range(calls):
        requests.post(f"{upstream.base_url}/chat/completions", json=body(model=model), timeout=5)


def submit_all(service: Service, bodies: list[dict[str, Any]]) -> list[str]:
    ids = []
    for item in bodies:
        reply = service.submit(item)
        assert reply.status_code == 202, reply.text
        ids.append(reply.json()["request_id"])
    return ids


def finals(service: Service, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    return [service.wait_final(request_id, timeout=timeout) for request_id in ids]


def metrics(service: Service) -> str:
    return requests.get(service.url + "/metrics", headers=service.headers(), timeout=5).text


def test_pacing_keeps_under_a_tight_limit_without_a_429(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    model = new_model("paced")
    # 30 a minute: the bucket's 30, then one every 2 s.
    set_limits(fake_upstream, {model: {"rpm": 30}})
    service = make_service(MAX_CONCURRENT="4", **backend_env)
    ids = submit_all(service, [body(f"p{i}", model=model) for i in range(34)])
    ended = finals(service, ids, timeout=40)
    assert [e["status"] for e in ended] == ["completed"] * 34
    stats = fake_upstream.stats()
    # Without pacing, at least the 4 calls past the bucket's 30 meet an empty bucket (and their
    # retries more). With it, on a loaded machine, a call or two at the burst's edge still can: the
    # upstream refills continuously and reports whole numbers, and an answer's report arrives after
    # calls admitted meanwhile (with Postgres, in a transaction of its own). The bench holds the
    # issue's bound over a long run: 0 of 2,000 calls.
    assert stats["rejected"].get(model, 0) <= 2
    assert len(stats["admitted"][model]) == 34
    # The last four waited for the refill, one every 2 s.
    admitted = sorted(stats["admitted"][model])
    assert admitted[-1] - admitted[0] >= 6.5
    text = metrics(service)
    assert f'llm_proxy_ratelimit_remaining_requests{{model="{model}"}}' in text
    assert f'llm_proxy_throttled_seconds_total{{model="{model}"}}' in text


def test_a_429_pauses_the_model_for_everybody_and_no_request_ends_rate_limited(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    model = new_model("cooled")
    set_limits(fake_upstream, {model: {"rpm": 60}})  # one a second once drained
    drain(fake_upstream, model, 60)
    # One retry only: requests that each fired into the wall on their own would end rate_limited.
    service = make_service(MAX_CONCURRENT="6", MAX_RETRIES="1", **backend_env)
    ids = submit_all(service, [body(f"c{i}", model=model) for i in range(6)])
    throttled = wait_until(
        lambda: [s for s in (service.status(i).json() for i in ids) if "throttled_until" in s], timeout=10
    )
    assert all(
        s["status"] == "pending" and s["throttled_until"] > time.time() * 1000 - 5000 for s in throttled
    )
    ended = finals(service, ids, timeout=30)
    assert [e["status"] for e in ended] == ["completed"] * 6
    rejected = fake_upstream.stats()["rejected"][model]
    # Only the calls sent before the first 429 came back hit the wall, each costing its own
    # request one attempt; every other request waited without losing one.
    assert rejected <= 6
    assert sum(e["attempts"] for e in ended) == 6 + rejected


def test_ceilings_are_never_exceeded_and_show_until_when(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    model_a, model_b = new_model("ceil-a"), new_model("ceil-b")
    service = make_service(MAX_CONCURRENT="8", MAX_RPM="4", RATE_LIMITS=f"{model_a}=2", **backend_env)
    started = time.time()
    ids_a = submit_all(
        service, [body("a", model=model_a, x_fake={"key": f"{model_a}-{i}"}) for i in range(4)]
    )
    ids_b = submit_all(
        service, [body("b", model=model_b, x_fake={"key": f"{model_b}-{i}"}) for i in range(4)]
    )

    def calls() -> dict[str, int]:
        seen = fake_upstream.stats()["by_key"]
        return {m: sum(n for k, n in seen.items() if k.startswith(m)) for m in (model_a, model_b)}

    wait_until(lambda: sum(calls().values()) >= 4, timeout=10)
    time.sleep(2.0)
    # Two of A (its own ceiling), and B the rest of the four the whole upstream may take.
    assert calls() == {model_a: 2, model_b: 2}
    waiting = [service.status(i).json() for i in ids_a[2:] + ids_b[2:]]
    assert [s["status"] for s in waiting] == ["pending"] * 4
    for status in waiting:
        # Not before the first calls leave the 60 s window (61 s, counting the slack).
        assert started + 60 <= status["throttled_until"] / 1000 <= time.time() + 62
    assert 'llm_proxy_throttled_seconds_total{model="*"}' in metrics(service)


def test_a_model_cooling_down_does_not_hold_back_another(
    make_service: MakeService, backend_env: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    slow, free = new_model("hol-slow"), new_model("hol-free")
    set_limits(fake_upstream, {slow: {"rpm": 2}})  # one call every 30 s once drained
    drain(fake_upstream, slow, 2)
    # One slot: requests of the cooling model must not keep it.
    service = make_service(MAX_CONCURRENT="1", **backend_env)
    held = submit_all(service, [body(f"s{i}", model=slow) for i in range(3)])
    started = time.monotonic()
    passing = submit_all(service, [body(f"f{i}", model=free) for i in range(3)])
    ended = finals(service, passing, timeout=10)
    assert [e["status"] for e in ended] == ["completed"] * 3
    assert time.monotonic() - started < 8
    for status in (service.status(i).json() for i in held):
        assert status["status"] == "pending" and status["throttled_until"] > time.time() * 1000 + 10_000
    # Order within the model is kept: the first of the held ones is first in line.
    positions = [service.status(i).json()["queue_position"] for i in held]
    assert positions == sorted(positions)


def test_two_postgres_workers_share_one_ceiling(
    make_service: MakeService, database_url: str, fake_upstream: FakeUpstream
) -> None:
    model = new_model("shared")
    service = make_service(
        DATABASE_URL=database_url, EMBEDDED_WORKER="false", MAX_CONCURRENT="8", RATE_LIMITS=f"{model}=3"
    )
    service.start("worker")
    service.start("worker")
    ids = submit_all(service, [body("w", model=model, x_fake={"key": f"{model}-{i}"}) for i in range(8)])

    def calls() -> int:
        return sum(n for k, n in fake_upstream.stats()["by_key"].items() if k.startswith(model))

    wait_until(lambda: calls() >= 3, timeout=15)
    time.sleep(2.0)
    assert calls() == 3
    statuses = [service.status(i).json()["status"] for i in ids]
    assert statuses.count("completed") == 3 and statuses.count("pending") == 5
