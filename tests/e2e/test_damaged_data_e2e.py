"""Damaged data files of the embedded back end, against the real service: the start refuses what it
cannot run on without losing requests silently (exit code 2, a message naming the file and the way
out), requests a lost queue leaves unfinished end as ``error`` of type ``lost``, and a junk metrics
file is set aside instead of failing every scrape."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import requests

from conftest import FakeUpstream, Receiver, Service, body, wait_until

MakeService = Callable[..., Service]
JUNK = bytes(range(256)) * 128
"""32 KiB of what no SQLite page and no metrics file holds."""


def _one_completed(service: Service) -> str:
    rid = str(service.submit(body()).json()["request_id"])
    assert service.wait_final(rid)["status"] == "completed"
    return rid


def test_junk_over_the_queue_database_refuses_the_start_and_says_how_to_recover(
    make_service: MakeService,
) -> None:
    service = make_service()
    _one_completed(service)
    assert service.stop() == 0
    database = service.data_dir / "queue" / "data.db"
    database.write_bytes(JUNK)

    web = service.start(wait=False)
    assert web.wait(timeout=30) == 2
    worker = service.start("worker")
    assert worker.wait(timeout=30) == 2
    log = service.log()
    assert log.count(f"{database} is damaged") == 2
    assert "restore DATA_DIR from a backup" in log and "-wal and -shm" in log
    assert f"mv {service.data_dir / 'queue'} {service.data_dir / 'queue'}.damaged" in log
    assert "Traceback" not in log
    assert database.read_bytes() == JUNK  # left as it was, for whoever recovers it


def test_requests_of_a_deleted_queue_database_end_as_lost_not_404(
    make_service: MakeService, fake_upstream: FakeUpstream, receiver: Receiver
) -> None:
    service = make_service(MAX_CONCURRENT="3", WEBHOOK_ALLOW_PRIVATE="true")
    fake_upstream.reset()
    started = [
        service.submit(body(x_fake={"key": f"lost-{i}", "delay": 60})).json()["request_id"] for i in range(2)
    ]
    hooked = service.submit(
        body(x_fake={"key": "lost-hook", "delay": 60}, webhookUrl=receiver.url("/ok/lost-hook"))
    ).json()["request_id"]
    started.append(hooked)
    wait_until(lambda: fake_upstream.stats()["inflight"] == 3, timeout=20)
    never_started = service.submit(body(x_fake={"key": "lost-waiting"})).json()["request_id"]
    wait_until(
        lambda: all(service.status(rid).json()["status"] == "processing" for rid in started), timeout=10
    )
    service.stop(signal.SIGKILL)
    queue = service.data_dir / "queue"
    for name in ("data.db", "data.db-wal", "data.db-shm"):
        (queue / name).unlink(missing_ok=True)

    # Starting anyway would answer 404 for everything the queue held: refused, with the way out.
    web = service.start(wait=False)
    assert web.wait(timeout=30) == 2
    log = service.log()
    identity = service.data_dir / "queue.identity"
    assert f"{queue / 'data.db'} is missing" in log and f"delete {identity}" in log
    assert "restore" in log and "Traceback" not in log

    identity.unlink()  # the operator accepts the loss
    service.start()
    for rid in started:
        final = service.wait_final(rid)
        assert final["status"] == "error", final
        assert final["error"]["type"] == "lost" and "lost" in final["error"]["message"]
    wait_until(lambda: receiver.received("lost-hook"), timeout=20)
    payload = json.loads(receiver.received("lost-hook")[0]["body"])
    assert payload["status"] == "error" and payload["error"]["type"] == "lost"
    assert f"request {hooked}: lost" in service.log()
    # Kept nowhere but in the lost queue: unknown, as the operator was told when accepting the loss.
    assert service.status(never_started).status_code == 404
    _one_completed(service)  # and the new queue works


def test_a_junk_metrics_file_is_set_aside_and_metrics_still_answer(make_service: MakeService) -> None:
    service = make_service()
    _one_completed(service)
    metrics = service.data_dir / "metrics"
    files = sorted(metrics.glob("counter_*.db"))
    assert files
    files[0].write_bytes(JUNK)
    junk = metrics / "counter_999999.db"
    junk.write_bytes(b"this is not a metrics file\n" * 100)

    for _ in range(2):
        reply = requests.get(f"{service.url}/metrics", headers=service.headers(), timeout=10)
        assert reply.status_code == 200, reply.text
        assert "llm_proxy_queue_depth" in reply.text and "llm_proxy_requests_total" in reply.text
    log = service.log()
    for damaged in (files[0], junk):
        assert log.count(f"metrics file {damaged} cannot be read") == 1  # said once, then set aside
        assert not damaged.exists() and Path(f"{damaged}.damaged").exists()
    assert "Traceback" not in log
