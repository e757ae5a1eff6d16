"""MAX_QUEUE under a burst of concurrent clients, on both back ends: never one request more."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import Service, body


def test_max_queue_is_exact_under_concurrent_submits(
    make_service: Callable[..., Service], backend_env: dict[str, str]
) -> None:
    # No worker takes anything, so every accepted request still waits at the end.
    service = make_service(MAX_QUEUE="50", EMBEDDED_WORKER="false", **backend_env)

    def submit(i: int) -> int:
        with requests.Session() as session:
            reply = session.post(
                service.url + "/v1/chat/completions",
                json=body(f"burst {i}"),
                headers=service.headers(),
                timeout=30,
            )
            if reply.status_code == 429:
                assert reply.json()["error"]["type"] == "queue_full"
                assert int(reply.headers["Retry-After"]) > 0
            return reply.status_code

    with ThreadPoolExecutor(max_workers=128) as pool:
        statuses = Counter(pool.map(submit, range(200)))
    assert statuses == {202: 50, 429: 150}
    # Still full afterwards: the 50 wait.
    reply = service.submit(body("one more"))
    assert reply.status_code == 429 and reply.json()["error"]["type"] == "queue_full"
