"""Webhooks through the real service (Procfile), delivered to a real receiver on loopback."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from conftest import SUPPORT, Receiver, Service, body, wait_until

MakeService = Callable[..., Service]
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
FAST = {
    "WEBHOOK_ALLOW_PRIVATE": "true",
    "WEBHOOK_RETRY_BASE": "0.05",
    "WEBHOOK_TIMEOUT": "5",  # never reached on loopback: a stall of a loaded machine is no timeout
    "WEBHOOK_SECRET": SECRET,
}


def unique() -> str:
    return uuid.uuid4().hex


def webhook_state(service: Service, request_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        entry = service.status(request_id).json()
        webhook = entry.get("webhook") or {}
        return entry if webhook.get("state") == state else None

    return dict(wait_until(reached, timeout=timeout, interval=0.05))


def test_completed_payload_is_signed_and_verifiable(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(**FAST)
    name = unique()
    rid = service.submit(body("hi", webhookUrl=receiver.url(f"/ok/{name}"))).json()["request_id"]
    entry = webhook_state(service, rid, "delivered")
    assert entry["webhook"]["attempts"] == 1 and entry["webhook"]["last_status"] == 200

    [post] = receiver.received(name)
    payload = Webhook(SECRET).verify(post["body"], post["headers"])
    assert payload == {
        "request_id": rid,
        "status": "completed",
        "endpoint": "chat/completions",
        "response": entry["response"],
    }
    assert post["headers"]["content-type"] == "application/json"
    assert post["headers"]["user-agent"].startswith("llm-proxy")
    assert post["headers"]["webhook-id"] and post["headers"]["webhook-signature"].startswith("v1,")


def test_error_payload(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(**FAST)
    name = unique()
    sent = body(webhookUrl=receiver.url(f"/ok/{name}"), x_fake={"status": 400})
    rid = service.submit(sent).json()["request_id"]
    webhook_state(service, rid, "delivered")
    payload = json.loads(receiver.received(name)[0]["body"])
    assert payload["request_id"] == rid and payload["status"] == "error"
    assert payload["error"]["type"] == "upstream_error" and payload["error"]["attempts"] == 1
    assert set(payload["error"]) >= {"message", "type", "attempts"}


def test_failing_receiver_is_retried_with_one_webhook_id(
    make_service: MakeService, receiver: Receiver
) -> None:
    service = make_service(**FAST)
    name = unique()
    rid = service.submit(body(webhookUrl=receiver.url(f"/fail/2/{name}"))).json()["request_id"]
    entry = webhook_state(service, rid, "delivered")
    assert entry["webhook"]["attempts"] == 3
    posts = receiver.received(name)
    assert len(posts) == 3
    assert len({p["headers"]["webhook-id"] for p in posts}) == 1
    assert len({p["body"] for p in posts}) == 1
    for post in posts:
        Webhook(SECRET).verify(post["body"], post["headers"])


def test_gone_stops_retries(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(**FAST)
    name = unique()
    rid = service.submit(body(webhookUrl=receiver.url(f"/gone/{name}"))).json()["request_id"]
    entry = webhook_state(service, rid, "failed")
    assert entry["status"] == "completed"
    assert entry["webhook"]["attempts"] == 1 and entry["webhook"]["last_status"] == 410
    assert len(receiver.received(name)) == 1


def test_retry_after_on_429_is_honoured(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(**{**FAST, "WEBHOOK_RETRY_BASE": "30"})
    name = unique()
    rid = service.submit(body(webhookUrl=receiver.url(f"/busy/{name}"))).json()["request_id"]
    # With a 30 s base only the receiver's Retry-After: 0 can bring the retry within the deadline.
    entry = webhook_state(service, rid, "delivered", timeout=15)
    assert entry["webhook"]["attempts"] == 2


def test_hanging_receiver_delays_no_one(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(**{**FAST, "WEBHOOK_TIMEOUT": "8"})
    hang, quick = unique(), unique()
    stuck = service.submit(body(webhookUrl=receiver.url(f"/hang/{hang}"))).json()["request_id"]
    wait_until(lambda: receiver.received(hang), timeout=10)
    fine = service.submit(body(webhookUrl=receiver.url(f"/ok/{quick}"))).json()["request_id"]
    webhook_state(service, fine, "delivered", timeout=10)
    # The hanging delivery is still on its first attempt while the other one went through.
    assert service.status(stuck).json()["webhook"]["attempts"] == 0
    entry = wait_until(
        lambda: (service.status(stuck).json()["webhook"]["attempts"] >= 1) and service.status(stuck).json(),
        timeout=15,
    )
    assert entry["webhook"]["state"] == "pending"
    assert entry["webhook"]["last_error"].startswith("timeout")


def test_worker_killed_before_delivery_delivers_after_restart_once(
    make_service: MakeService, receiver: Receiver
) -> None:
    service = make_service(**{**FAST, "WEBHOOK_TIMEOUT": "10"})
    name = unique()
    pid = wait_until(service.worker_pids, timeout=10)[0]
    rid = service.submit(body(webhookUrl=receiver.url(f"/slow/5/{name}"))).json()["request_id"]
    wait_until(lambda: receiver.received(name), timeout=10)
    assert service.status(rid).json()["status"] == "completed"
    os.kill(pid, signal.SIGKILL)  # completed, delivery under way, not yet answered

    entry = webhook_state(service, rid, "delivered", timeout=30)
    posts = receiver.received(name)
    assert len(posts) == 2
    assert posts[0]["headers"]["webhook-id"] == posts[1]["headers"]["webhook-id"]
    assert entry["webhook"]["state"] == "delivered"

    # A delivered webhook is not repeated by another restart.
    service.stop(signal.SIGTERM)
    service.start()
    wait_until(service.worker_pids, timeout=10)
    follow = service.submit(body(webhookUrl=receiver.url(f"/ok/{name}"))).json()["request_id"]
    webhook_state(service, follow, "delivered")
    assert len(receiver.received(name)) == 3


def test_private_destinations_are_refused(make_service: MakeService, receiver: Receiver) -> None:
    service = make_service(WEBHOOK_RETRY_BASE="0.05")
    for url in [
        receiver.url("/ok/x"),
        "http://2130706433/",
        "http://0x7f.1/",
        "http://[::1]/",
        "http://169.254.169.254/latest",
        "http://10.0.0.1/",
        "http://localhost:9/",
    ]:
        reply = service.submit(body(webhookUrl=url))
        assert reply.status_code == 400, url
        assert reply.json()["error"]["details"][0]["path"] == "webhookUrl"
    for url in ["ftp://example.com/", "http://user:pw@example.com/", "http:///x"]:
        assert service.submit(body(webhookUrl=url)).status_code == 400


def test_a_name_resolving_to_a_non_public_address_fails_without_sending(make_service: MakeService) -> None:
    host = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)}
    if not addresses:
        pytest.fail("the machine's own name does not resolve")
    service = make_service(WEBHOOK_RETRY_BASE="0.05")
    rid = service.submit(body(webhookUrl=f"http://{host}:9/hook")).json()["request_id"]
    entry = webhook_state(service, rid, "failed")
    assert entry["status"] == "completed"
    assert entry["webhook"]["attempts"] == 1
    assert entry["webhook"]["last_error"].startswith("refused")


@pytest.fixture
def other_receiver() -> Iterator[Receiver]:
    """A second receiver: another destination (host:port) than the session's one."""
    process = subprocess.Popen(
        [sys.executable, str(SUPPORT / "webhook_receiver.py")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        yield Receiver(process=process, port=int(line.split()[1]))
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_hanging_destination_holds_back_no_other_destination(
    make_service: MakeService, receiver: Receiver, other_receiver: Receiver
) -> None:
    # Four shared slots, so one per destination; each attempt at the hanging receiver holds its
    # slot for WEBHOOK_TIMEOUT. Without a per-destination limit, four of them would hold all four.
    service = make_service(**{**FAST, "WEBHOOK_CONCURRENCY": "4", "WEBHOOK_TIMEOUT": "15"})
    hangs = [unique() for _ in range(8)]
    stuck = [
        service.submit(body(webhookUrl=receiver.url(f"/hang/{name}"))).json()["request_id"] for name in hangs
    ]
    for rid in stuck:
        assert service.wait_final(rid, timeout=10)["status"] == "completed"
    wait_until(lambda: any(receiver.received(name) for name in hangs), timeout=10)

    quick = unique()
    started = time.monotonic()
    fine = service.submit(body(webhookUrl=other_receiver.url(f"/ok/{quick}"))).json()["request_id"]
    entry = webhook_state(service, fine, "delivered", timeout=5)
    assert time.monotonic() - started < 5
    assert entry["webhook"]["attempts"] == 1 and len(other_receiver.received(quick)) == 1
    # The hanging destination still has one send under way, the others wait their turn there.
    assert sum(len(receiver.received(name)) for name in hangs) == 1
    assert all(service.status(rid).json()["webhook"]["attempts"] == 0 for rid in stuck)
