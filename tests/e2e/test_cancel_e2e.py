"""DELETE /v1/chat/completions/<id> against the real service."""

from __future__ import annotations

import base64
from collections.abc import Callable

import gevent
import requests

from conftest import FakeUpstream, Receiver, Service, body, wait_until

MakeService = Callable[..., Service]


def delete(service: Service, request_id: str) -> requests.Response:
    return requests.delete(
        f"{service.url}/v1/chat/completions/{request_id}", headers=service.headers(), timeout=20
    )


def test_a_pending_request_is_cancelled_and_never_sent(
    make_service: MakeService, fake_upstream: FakeUpstream, receiver: Receiver
) -> None:
    service = make_service(EMBEDDED_WORKER="false", WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_RETRY_BASE="0.05")
    fake_upstream.reset()
    rid = service.submit(body(x_fake={"key": "never"}, webhookUrl=receiver.url("/ok/cancelled-hook"))).json()[
        "request_id"
    ]
    reply = delete(service, rid)
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    assert delete(service, rid).json()["status"] == "cancelled"  # twice is harmless
    service.start("worker")
    after = service.submit(body(x_fake={"key": "after"})).json()["request_id"]
    assert service.wait_final(after)["status"] == "completed"
    assert service.status(rid).json()["status"] == "cancelled"
    assert fake_upstream.stats()["by_key"] == {"after": 1}
    hook = wait_until(lambda: receiver.received("cancelled-hook"), timeout=15)
    assert (
        hook[0]["body"] == f'{{"request_id": "{rid}", "status": "cancelled", "endpoint": "chat/completions"}}'
    )


def test_a_processing_request_has_its_call_aborted(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    fake_upstream.reset()
    rid = service.submit(body(x_fake={"key": "abort-me", "delay": 30})).json()["request_id"]
    wait_until(lambda: fake_upstream.stats()["inflight"] == 1, timeout=10)
    reply = delete(service, rid)
    assert reply.status_code == 200
    assert reply.json()["status"] == "cancelled" and reply.json()["attempts"] == 1
    # The slot is free again at once: another request goes through while the aborted one would
    # still be sleeping upstream.
    quick = service.submit(body(x_fake={"key": "next"})).json()["request_id"]
    assert service.wait_final(quick, timeout=10)["status"] == "completed"
    assert service.status(rid).json()["status"] == "cancelled"


def test_finished_requests_cannot_be_cancelled(make_service: MakeService) -> None:
    service = make_service()
    rid = service.submit(body()).json()["request_id"]
    service.wait_final(rid)
    reply = delete(service, rid)
    assert reply.status_code == 409 and reply.json()["error"]["type"] == "request_not_cancellable"
    assert delete(service, "chatreq_doesnotexist0000000").status_code == 404


def test_a_waiting_client_learns_of_the_cancel(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    waiting = gevent.spawn(
        requests.post,
        f"{service.url}/v1/chat/completions",
        json=body(x_fake={"key": "wait-cancel", "delay": 30}),
        headers={**service.headers(), "Prefer": "wait", "Idempotency-Key": base64.b32encode(b"wc").decode()},
        timeout=30,
    )
    wait_until(lambda: fake_upstream.stats()["by_key"].get("wait-cancel"), timeout=10)
    request_id = requests.post(
        f"{service.url}/v1/chat/completions",
        json=body(x_fake={"key": "wait-cancel", "delay": 30}),
        headers={**service.headers(), "Idempotency-Key": base64.b32encode(b"wc").decode()},
        timeout=10,
    ).json()["request_id"]
    assert delete(service, request_id).status_code == 200
    reply = waiting.get(timeout=20)
    assert reply.status_code == 409 and reply.json()["error"]["type"] == "request_cancelled"
