"""GET /health against the real service: a worker stopped, killed or never started, and a store that
cannot be read, each make it 503 with the reason; it is 200 again once they are back.

LEASE_TIMEOUT=3 here, so a worker silent for 6 s (2 x LEASE_TIMEOUT) counts as gone."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import requests

from conftest import Service, body, wait_until
from support.postgres import PostgresServer

MakeService = Callable[..., Service]
LEASE = {"LEASE_TIMEOUT": "3"}
SILENCE = 6.0
# The silence, plus a beat period (1 s), the result cache (1 s) and the test's own polling.
REPORTED_WITHIN = SILENCE + 6


def health(service: Service) -> tuple[int, dict[str, Any]] | None:
    try:
        reply = requests.get(service.url + "/health", timeout=5)
    except requests.RequestException:
        return None
    return reply.status_code, reply.json()


def healthy(service: Service) -> bool:
    return health(service) == (200, {"status": "ok", "problems": []})


def problem(service: Service, check: str) -> dict[str, str] | None:
    """The reported problem of that check, when /health answers 503 with one."""
    answer = health(service)
    if answer is None or answer[0] != 503:
        return None
    found = answer[1]
    assert found["status"] == "unavailable"
    return next((p for p in found["problems"] if p["check"] == check), None)


def test_a_stopped_worker_makes_health_503_until_it_runs_again(
    make_service: MakeService, backend_env: dict[str, str]
) -> None:
    service = make_service(**{**backend_env, **LEASE})
    assert service.wait_final(service.submit(body()).json()["request_id"])["status"] == "completed"
    assert healthy(service)
    time.sleep(2)  # the worker has beaten by now (every second, from a second after its start)
    [worker] = service.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        found = wait_until(lambda: problem(service, "worker"), timeout=REPORTED_WITHIN + 5, interval=0.2)
        assert SILENCE - 2 <= time.monotonic() - stopped <= REPORTED_WITHIN  # beats are about 1 s apart
        assert "no worker heartbeat for" in found["message"]
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_until(lambda: healthy(service), timeout=10, interval=0.2)
    assert service.wait_final(service.submit(body()).json()["request_id"])["status"] == "completed"


def test_without_a_worker_health_turns_503_after_the_grace_period_until_one_runs(
    make_service: MakeService, backend_env: dict[str, str]
) -> None:
    service = make_service(EMBEDDED_WORKER="false", **{**backend_env, **LEASE})
    # The grace period: a worker started alongside has not beaten yet.
    assert healthy(service)
    found = wait_until(lambda: problem(service, "worker"), timeout=REPORTED_WITHIN + 5, interval=0.2)
    assert "python worker.py" in found["message"]
    worker = service.start("worker")
    wait_until(lambda: healthy(service), timeout=10, interval=0.2)
    assert service.wait_final(service.submit(body()).json()["request_id"])["status"] == "completed"
    # Killed, it is missed again.
    worker.kill()
    worker.wait(timeout=10)
    killed = time.monotonic()
    wait_until(lambda: problem(service, "worker"), timeout=REPORTED_WITHIN + 5, interval=0.2)
    assert time.monotonic() - killed >= SILENCE - 2


def test_a_database_that_is_down_makes_health_503_until_it_is_back(
    make_service: MakeService, database_url: str, postgres_server: PostgresServer
) -> None:
    service = make_service(DATABASE_URL=database_url, **LEASE)
    assert healthy(service)
    postgres_server.stop("immediate")
    try:
        found = wait_until(lambda: problem(service, "store"), timeout=10, interval=0.2)
        assert "cannot be read or written" in found["message"]
    finally:
        postgres_server.start()
    wait_until(lambda: healthy(service), timeout=30, interval=0.5)


def test_an_embedded_queue_that_cannot_be_read_makes_health_503_until_it_is_repaired(
    make_service: MakeService,
) -> None:
    service = make_service(**LEASE)
    # The worker is up, its tables set up.
    assert service.wait_final(service.submit(body()).json()["request_id"])["status"] == "completed"
    assert healthy(service)
    # A table of the queue's database gone, as damage would leave it: every read of the counts fails.
    database = sqlite3.connect(str(service.data_dir / "queue" / "data.db"), timeout=10, isolation_level=None)
    try:
        database.execute("ALTER TABLE ack_queue_jobs_counts RENAME TO hidden_counts")
        try:
            found = wait_until(lambda: problem(service, "store"), timeout=10, interval=0.2)
            assert "cannot be read or written" in found["message"]
            assert "no such table" in service.log()  # the details, for the operator
        finally:
            database.execute("ALTER TABLE hidden_counts RENAME TO ack_queue_jobs_counts")
    finally:
        database.close()
    wait_until(lambda: healthy(service), timeout=10, interval=0.2)
    assert service.wait_final(service.submit(body()).json()["request_id"])["status"] == "completed"
