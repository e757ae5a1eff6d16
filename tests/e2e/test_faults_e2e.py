"""Faults against the real service: killed processes, SIGTERM, a locked disk. Every test counts:
how many were accepted, how many completed, none lost."""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable

from conftest import FakeUpstream, Receiver, Service, body, wait_until

MakeService = Callable[..., Service]


def test_kill9_of_the_whole_service_after_a_burst_loses_nothing(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(MAX_CONCURRENT="2", **backend_env)
    fake_upstream.reset()
    accepted = []
    for i in range(40):
        reply = service.submit(body(f"burst {i}", x_fake={"key": f"burst-{i}", "delay": 0.2}))
        assert reply.status_code == 202
        accepted.append(reply.json()["request_id"])
    service.stop(signal.SIGKILL)  # web and worker together, mid-burst

    service.start()
    statuses = [service.status(rid) for rid in accepted]
    assert [s.status_code for s in statuses] == [200] * len(accepted)  # every one still known
    finals = [service.wait_final(rid, timeout=60) for rid in accepted]
    assert len(accepted) == 40
    assert sum(f["status"] == "completed" for f in finals) == 40
    calls = fake_upstream.stats()["by_key"]
    assert all(calls.get(f"burst-{i}", 0) >= 1 for i in range(40))


def test_sigterm_finishes_what_it_can_puts_back_the_rest_and_they_complete_after_restart(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(MAX_CONCURRENT="3", SHUTDOWN_TIMEOUT="1.5", **backend_env)
    fake_upstream.reset()
    quick = service.submit(body(x_fake={"key": "term-quick", "delay": 0.8})).json()["request_id"]
    cut = [
        service.submit(body(x_fake={"key": f"term-cut-{i}", "delay": 30, "slow_times": 1})).json()[
            "request_id"
        ]
        for i in range(2)
    ]
    waiting = [service.submit(body(x_fake={"key": f"term-wait-{i}"})).json()["request_id"] for i in range(3)]
    # Its own three calls (calls that earlier tests cut short may still be running upstream).
    wait_until(
        lambda: all(
            _calls_reach(fake_upstream, key, 1) for key in ("term-quick", "term-cut-0", "term-cut-1")
        ),
        timeout=10,
    )
    worker_pid = service.worker_pids()[0]

    assert service.process is not None
    started = time.monotonic()
    os.kill(service.process.pid, signal.SIGTERM)
    assert service.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
    wait_until(lambda: not _alive(worker_pid), timeout=10)

    service.start()
    done = service.wait_final(quick)
    assert done["status"] == "completed" and done["attempts"] == 1
    for rid in cut:
        final = service.wait_final(rid, timeout=30)
        # The call cut short by the shutdown does not count as an attempt.
        assert final["status"] == "completed" and final["attempts"] == 1
    assert all(service.wait_final(rid)["status"] == "completed" for rid in waiting)
    calls = fake_upstream.stats()["by_key"]
    assert calls["term-quick"] == 1
    assert calls["term-cut-0"] == 2 and calls["term-cut-1"] == 2


def _calls_reach(upstream: FakeUpstream, key: str, count: int) -> bool:
    return bool(upstream.stats()["by_key"].get(key) == count)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_request_that_keeps_killing_the_worker_ends_as_an_error(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(MAX_RETRIES="1", **backend_env)
    fake_upstream.reset()
    rid = service.submit(body(x_fake={"key": "killer", "delay": 30})).json()["request_id"]
    for calls in (1, 2):
        wait_until(functools.partial(_calls_reach, fake_upstream, "killer", calls), timeout=20)
        os.kill(service.worker_pids()[0], signal.SIGKILL)
    final = service.wait_final(rid, timeout=30)
    assert final["status"] == "error"
    assert final["error"]["type"] == "interrupted" and final["error"]["attempts"] == 2
    assert fake_upstream.stats()["by_key"]["killer"] == 2


def test_a_locked_disk_answers_503_and_the_service_recovers(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service()
    before = service.submit(body()).json()["request_id"]
    service.wait_final(before)

    holder = sqlite3.connect(str(service.data_dir / "queue" / "data.db"), timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        refused = service.submit(body())
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert int(refused.headers["Retry-After"]) > 0
        # Reads of finished requests and health still work meanwhile.
        assert service.status(before).json()["status"] == "completed"
        assert service.healthy()
    finally:
        holder.rollback()
        holder.close()

    after = service.submit(body())
    assert after.status_code == 202
    assert service.wait_final(after.json()["request_id"])["status"] == "completed"


def test_logs_hold_no_keys_and_no_message_contents(
    make_service: MakeService, receiver: Receiver, backend_env: dict[str, str]
) -> None:
    service = make_service(
        OPENAI_API_KEY="sk-upstream-do-not-log-7777", WEBHOOK_ALLOW_PRIVATE="true", **backend_env
    )
    secret_text = "my-secret-prompt-text-4242"
    hook = f"logs-{uuid.uuid4().hex}"  # the receiver outlives the test: its own path per run
    rid = service.submit(body(secret_text, webhookUrl=receiver.url(f"/ok/{hook}"))).json()["request_id"]
    service.wait_final(rid)
    wait_until(lambda: receiver.received(hook), timeout=10)
    # The log is not simply empty: the worker logs the request's end, just after storing it.
    wait_until(lambda: rid in service.log(), timeout=10)
    service.submit(body(), key="wrong-key-that-must-not-be-logged")
    log = service.log()
    for secret in [
        "sk-upstream-do-not-log-7777",
        secret_text,
        service.env["API_KEY"],
        "wrong-key-that-must-not-be-logged",
        *([backend_env["DATABASE_URL"]] if "DATABASE_URL" in backend_env else []),
    ]:
        assert secret not in log


def test_a_data_dir_in_another_layout_is_refused_with_a_message(make_service: MakeService) -> None:
    service = make_service(start=False)
    (service.data_dir / "queue").mkdir(parents=True)
    with sqlite3.connect(service.data_dir / "queue" / "data.db") as db:
        db.execute("CREATE TABLE ack_queue_jobs (_id INTEGER PRIMARY KEY, payload BLOB, state TEXT)")
    process = service.start(wait=False)
    assert process.wait(timeout=30) == 1
    worker = service.start("worker")
    assert worker.wait(timeout=30) == 1
    log = service.log()
    assert log.count("the embedded back end cannot run safely") == 2
    assert "ack_queue_jobs" in log and "requirements.txt" in log
    assert "Traceback" not in log


def _ctrl_c(process_group: int) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
    os.killpg(process_group, signal.SIGINT)


def test_ctrl_c_says_what_it_waits_for_and_a_second_one_puts_the_calls_back_now(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(MAX_CONCURRENT="2", SHUTDOWN_TIMEOUT="60", **backend_env)
    fake_upstream.reset()
    ids = [
        service.submit(body(x_fake={"key": f"ctrl-c-{i}", "delay": 25, "slow_times": 1})).json()["request_id"]
        for i in range(2)
    ]
    wait_until(lambda: all(_calls_reach(fake_upstream, f"ctrl-c-{i}", 1) for i in range(2)), timeout=10)
    assert service.process is not None
    _ctrl_c(service.process.pid)
    # The web process and its worker each log what they wait for; the worker's line may come last.
    wait_until(lambda: "2 request(s) in flight" in service.log(), timeout=10)
    assert "SHUTDOWN_TIMEOUT" in service.log() and "Ctrl-C again" in service.log()
    time.sleep(0.5)
    assert service.process.poll() is None  # still waiting for the calls, as it said
    started = time.monotonic()
    _ctrl_c(service.process.pid)
    assert service.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 15  # not the 60 s of SHUTDOWN_TIMEOUT
    # Put back, not lost: after a restart both run again and the cut calls do not count.
    service.start()
    for rid in ids:
        final = service.wait_final(rid, timeout=30)
        assert final["status"] == "completed" and final["attempts"] == 1


def test_a_second_ctrl_c_hurries_a_worker_run_on_its_own(
    make_service: MakeService, fake_upstream: FakeUpstream, backend_env: dict[str, str]
) -> None:
    service = make_service(MAX_CONCURRENT="2", SHUTDOWN_TIMEOUT="60", EMBEDDED_WORKER="false", **backend_env)
    worker = service.start("worker")
    fake_upstream.reset()
    rid = service.submit(body(x_fake={"key": "ctrl-c-alone", "delay": 25, "slow_times": 1})).json()[
        "request_id"
    ]
    wait_until(lambda: _calls_reach(fake_upstream, "ctrl-c-alone", 1), timeout=10)
    _ctrl_c(worker.pid)
    wait_until(lambda: "Ctrl-C again" in service.log(), timeout=10)
    time.sleep(0.5)
    assert worker.poll() is None
    _ctrl_c(worker.pid)
    assert worker.wait(timeout=20) == 0
    assert service.status(rid).json()["status"] == "pending"  # back in the queue
    service.start("worker")
    assert service.wait_final(rid, timeout=30)["status"] == "completed"
