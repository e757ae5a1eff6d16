"""Answers over MAX_RESPONSE_BYTES against the real service: they end as errors, read only up to the
cap, and the requests beside them go on as usual."""

from __future__ import annotations

import json
from collections.abc import Callable

import requests

from conftest import FakeUpstream, Service, body, wait_until

MakeService = Callable[..., Service]


def test_an_answer_over_the_cap_is_an_error_and_a_request_beside_it_completes(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_RESPONSE_BYTES="100000", MAX_RETRIES="2")
    fake_upstream.reset()
    big = service.submit(body(x_fake={"key": "e2e-huge", "huge": 200_000_000, "chunked": True}))
    small = service.submit(body("beside", x_fake={"key": "e2e-small", "delay": 0.2}))
    assert big.status_code == small.status_code == 202

    failed = service.wait_final(big.json()["request_id"])
    assert failed["status"] == "error"
    assert failed["error"]["type"] == "response_too_large"
    assert failed["error"]["attempts"] == 1  # not retried
    done = service.wait_final(small.json()["request_id"])
    assert done["status"] == "completed"
    assert done["response"]["choices"][0]["message"]["content"] == "echo: beside"

    wait_until(lambda: "e2e-huge" in fake_upstream.stats()["finished"])
    stats = fake_upstream.stats()
    assert stats["finished"]["e2e-huge"] is False
    assert stats["sent"]["e2e-huge"] < 50_000_000
    assert stats["by_key"] == {"e2e-huge": 1, "e2e-small": 1}


def test_a_relayed_stream_over_the_cap_ends_with_an_error(
    make_service: MakeService, fake_upstream: FakeUpstream
) -> None:
    service = make_service(MAX_RESPONSE_BYTES="100000")
    with requests.post(
        f"{service.url}/v1/chat/completions",
        json=body(stream=True, x_fake={"key": "e2e-stream", "chunks": 5_000, "piece": "z" * 100}),
        headers={**service.headers(), "Prefer": "wait"},
        stream=True,
        timeout=30,
    ) as reply:
        assert reply.status_code == 200
        request_id = reply.headers["X-Request-Id"]
        lines = [line for line in reply.iter_lines() if line.startswith(b"data: ")]
    relayed = sum(len(line) + 2 for line in lines)
    assert relayed < 110_000  # the cap, plus the error event
    assert lines[-1] != b"data: [DONE]"
    final = service.wait_final(request_id)
    assert final["status"] == "error"
    assert final["error"]["type"] == "response_too_large"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"
