"""The real service, started as the Procfile starts it, against the fake upstream on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from conftest import API_KEY, ROOT, FakeUpstream, Receiver, Service, body, procfile_command, wait_until

MakeService = Callable[..., Service]


def test_request_completes_and_upstream_sees_only_its_own_key(
    make_service: MakeService, fake_upstream: FakeUpstream, receiver: Receiver
) -> None:
    service = make_service(WEBHOOK_ALLOW_PRIVATE="true")
    fake_upstream.reset()
    sent = body(
        "capital of France?",
        webhookUrl=receiver.url("/ok/basic"),
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        x_fake={"key": "e2e-basic"},
    )
    reply = service.submit(sent)
    assert reply.status_code == 202
    accepted = reply.json()
    assert accepted["status"] == "pending"
    assert len(accepted["request_id"]) >= 22
    # The only request of an idle service: first in line, or already taken by the worker.
    assert (accepted["queue_position"], accepted["active_requests"]) in ((1, 0), (0, 0), (0, 1))

    final = service.wait_final(accepted["request_id"])
    assert final["status"] == "completed"
    assert final["request"] == sent
    assert final["response"]["object"] == "chat.completion"
    assert final["response"]["choices"][0]["message"]["content"] == "echo: capital of France?"
    assert isinstance(final["timestamp"], int) and final["timestamp"] > 1_600_000_000_000

    stats = fake_upstream.stats()
    assert stats["by_key"] == {"e2e-basic": 1}
    assert stats["authorizations"] == ["Bearer sk-upstream-secret-0000"]
    assert stats["bodies_with_proxy_fields"] == 0
    assert stats["streamed"] == 0
    assert API_KEY not in service.log()
    assert "sk-upstream-secret-0000" not in service.log()


def test_concurrency_ceiling_holds_and_queue_positions_count_down(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_CONCURRENT="3")
    fake_upstream.reset()
    ids = []
    for i in range(12):
        # The first three (FIFO) hold their slots long enough for the probe below to see them.
        reply = service.submit(body(f"n{i}", x_fake={"key": f"ceil-{i}", "delay": 2.0 if i < 3 else 0.25}))
        assert reply.status_code == 202
        ids.append(reply.json()["request_id"])

    # While the first ones run, a later request waits with a 1-based place in line.
    wait_until(lambda: fake_upstream.stats()["inflight"] == 3, timeout=10)
    last = service.status(ids[-1]).json()
    assert last["status"] == "pending"
    assert 1 <= last["queue_position"] <= 9
    accepted = service.submit(body("probe", x_fake={"key": "ceil-probe"})).json()
    assert accepted["active_requests"] == 3

    results = [service.wait_final(i, timeout=30) for i in ids]
    assert [r["status"] for r in results] == ["completed"] * 12
    stats = fake_upstream.stats()
    assert stats["peak"] == 3
    assert all(stats["by_key"][f"ceil-{i}"] == 1 for i in range(12))


def test_transient_failures_are_retried_and_permanent_ones_are_not(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_RETRIES="3")
    fake_upstream.reset()
    flaky = service.submit(body(x_fake={"key": "flaky", "fail_times": 2, "fail_status": 503})).json()
    bad = service.submit(body(x_fake={"key": "bad", "status": 400})).json()
    down = service.submit(body(x_fake={"key": "down", "fail_times": 99, "fail_status": 500})).json()
    quota = service.submit(
        body(x_fake={"key": "quota", "status": 429, "error_code": "insufficient_quota"})
    ).json()

    done = service.wait_final(flaky["request_id"])
    assert done["status"] == "completed" and done["attempts"] == 3

    refused = service.wait_final(bad["request_id"])
    assert refused["status"] == "error"
    assert refused["error"]["type"] == "upstream_error"
    assert refused["error"]["attempts"] == 1
    assert refused["error"]["upstream_status"] == 400
    assert "induced status 400" in refused["error"]["message"]

    failed = service.wait_final(down["request_id"])
    assert failed["status"] == "error" and failed["error"]["attempts"] == 4

    no_quota = service.wait_final(quota["request_id"])
    assert no_quota["error"]["type"] == "rate_limited" and no_quota["error"]["attempts"] == 1

    assert fake_upstream.stats()["by_key"] == {"flaky": 3, "bad": 1, "down": 4, "quota": 1}


def test_each_key_sees_only_its_own_requests(make_service: MakeService) -> None:
    other = "second-key-abcdefgh"
    service = make_service(API_KEY=f"{API_KEY}, {other}")
    mine = service.submit(body()).json()["request_id"]
    theirs = service.submit(body(), key=other).json()["request_id"]
    assert service.status(mine).status_code == 200
    assert service.status(theirs, key=other).status_code == 200
    assert service.status(mine, key=other).status_code == 404
    assert service.status(theirs).json()["error"]["type"] == "request_not_found"
    bearer = requests.get(
        f"{service.url}/v1/chat/completions/{theirs}", headers={"Authorization": f"Bearer {other}"}, timeout=5
    )
    assert bearer.status_code == 200


def test_without_api_key_a_generated_key_is_required_and_kept(make_service: MakeService) -> None:
    service = make_service(API_KEY="")
    assert service.submit(body()).status_code == 401
    key = (service.data_dir / "api_key").read_text().strip()
    assert len(key) >= 40
    assert key in service.log()
    assert service.submit(body(), key=key).status_code == 202

    service.stop(signal.SIGTERM)
    first_log = service.log()
    service.start()
    assert (service.data_dir / "api_key").read_text().strip() == key
    assert service.log()[len(first_log) :].count(key) == 0
    assert service.submit(body(), key=key).status_code == 202


def test_bad_configuration_exits_with_code_2_and_names_the_variable(
    make_service: MakeService,
) -> None:
    service = make_service(start=False, MAX_CONCURRENT="abc")
    process = service.start(wait=False)
    assert process.wait(timeout=20) == 2
    assert "MAX_CONCURRENT" in service.log()


@pytest.mark.parametrize(
    "name,placeholder",
    [("API_KEY", "change-me-to-a-long-random-key"), ("OPENAI_API_KEY", "sk-your-upstream-key")],
)
def test_the_example_s_placeholder_keys_stop_the_start(
    make_service: MakeService, name: str, placeholder: str
) -> None:
    service = make_service(start=False, **{name: placeholder})
    process = service.start(wait=False)
    assert process.wait(timeout=20) == 2
    assert f"{name} is still the example value" in service.log()


def test_a_second_worker_on_the_same_data_dir_refuses_to_start(make_service: MakeService) -> None:
    service = make_service()
    wait_until(service.worker_pids, timeout=10)
    second = subprocess.run(
        [sys.executable, "worker.py"],
        cwd=ROOT,
        env=service.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 3
    assert "another worker is already running" in second.stderr


def test_killed_worker_is_restarted_and_interrupted_request_completes(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    fake_upstream.reset()
    first_pid = wait_until(service.worker_pids, timeout=10)[0]
    slow = service.submit(body(x_fake={"key": "crash", "delay": 1.0})).json()["request_id"]
    wait_until(lambda: fake_upstream.stats()["inflight"] == 1, timeout=10)
    os.kill(first_pid, signal.SIGKILL)

    def new_worker() -> bool:
        pids = service.worker_pids()
        return bool(pids) and pids[0] != first_pid

    wait_until(new_worker, timeout=15)
    final = service.wait_final(slow, timeout=20)
    assert final["status"] == "completed"
    assert final["attempts"] == 2  # the cut-short call counts
    assert fake_upstream.stats()["by_key"]["crash"] == 2


def test_web_alone_and_separate_worker_from_the_procfile(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    assert procfile_command("worker")[-1] == "worker.py"
    service = make_service(EMBEDDED_WORKER="false")
    accepted = service.submit(body(x_fake={"key": "separate"})).json()
    time.sleep(0.3)
    assert service.status(accepted["request_id"]).json()["status"] == "pending"
    service.start("worker")
    assert service.wait_final(accepted["request_id"])["status"] == "completed"


def test_sigterm_stops_web_and_worker(make_service: MakeService) -> None:
    service = make_service()
    worker_pid = wait_until(service.worker_pids, timeout=10)[0]
    assert service.process is not None
    os.kill(service.process.pid, signal.SIGTERM)
    assert service.process.wait(timeout=20) == 0

    def gone() -> bool:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=10)


def _json_errors(service: Service) -> list[tuple[int, Any]]:
    out = []
    for method, path, data in [
        ("GET", "/nowhere", None),
        ("DELETE", "/health", None),
        ("POST", "/v1/chat/completions", b"{"),
    ]:
        reply = requests.request(method, service.url + path, data=data, headers=service.headers(), timeout=5)
        out.append((reply.status_code, reply.json()))
    return out


def test_live_errors_are_json_with_security_headers(make_service: MakeService) -> None:
    service = make_service()
    assert [code for code, _ in _json_errors(service)] == [404, 405, 400]
    reply = requests.get(service.url + "/nowhere", timeout=5)
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert "Server" not in reply.headers
    big = requests.post(
        service.url + "/v1/chat/completions",
        headers=service.headers(),
        data=b"x" * (1024 * 1024 + 10),
        timeout=10,
    )
    assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"

    def chunks() -> Any:
        for _ in range(40):
            yield b"y" * 32768

    chunked = requests.post(
        service.url + "/v1/chat/completions", headers=service.headers(), data=chunks(), timeout=10
    )
    assert chunked.status_code == 413


def test_long_poll_answers_as_soon_as_the_request_completes(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(SYNC_WAIT_MAX="30")
    rid = service.submit(body(x_fake={"key": "longpoll", "delay": 0.5})).json()["request_id"]
    # Polling would take the full 30 s if the worker's notification did not wake the wait.
    reply = requests.get(
        f"{service.url}/v1/chat/completions/{rid}?wait=30", headers=service.headers(), timeout=(5, 20)
    )
    assert reply.status_code == 200 and reply.json()["status"] == "completed"
    assert "Retry-After" not in reply.headers


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and line.split(" ")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_across_web_and_worker(make_service: MakeService, fake_upstream: FakeUpstream) -> None:
    service = make_service(MAX_RETRIES="1", RETRY_BASE_DELAY="0.01")
    ok = [service.submit(body(x_fake={"key": f"m-ok-{i}"})).json()["request_id"] for i in range(3)]
    bad = service.submit(body(x_fake={"key": "m-bad", "fail_times": 9})).json()["request_id"]
    for rid in [*ok, bad]:
        service.wait_final(rid)
    assert requests.get(f"{service.url}/metrics", timeout=5).status_code == 401
    reply = requests.get(f"{service.url}/metrics", headers=service.headers(), timeout=5)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/plain")
    text = reply.text
    assert _metric(text, 'llm_proxy_requests_total{endpoint="chat/completions",status="completed"}') == 3
    assert _metric(text, 'llm_proxy_requests_total{endpoint="chat/completions",status="error"}') == 1
    assert (
        _metric(text, 'llm_proxy_upstream_attempts_total{endpoint="chat/completions",outcome="success"}') == 3
    )
    assert (
        _metric(
            text, 'llm_proxy_upstream_attempts_total{endpoint="chat/completions",outcome="upstream_error"}'
        )
        == 2
    )
    assert _metric(text, 'llm_proxy_upstream_seconds_count{endpoint="chat/completions"}') == 5
    assert _metric(text, "llm_proxy_queue_depth") == 0 and _metric(text, "llm_proxy_inflight") == 0
    assert "llm_proxy_webhook_deliveries_total" in text


def test_metrics_can_be_public(make_service: MakeService) -> None:
    service = make_service(METRICS_PUBLIC="true")
    reply = requests.get(f"{service.url}/metrics", timeout=5)
    assert reply.status_code == 200 and "llm_proxy_queue_depth 0.0" in reply.text
