"""The upstream client against the fake upstream over loopback, and the retry policy's arithmetic."""

from __future__ import annotations

import json
import random
import socket
from email.utils import formatdate
from typing import Any

import pytest

from conftest import FakeUpstream, body, free_port
from llm_proxy.upstream.client import UpstreamClient
from llm_proxy.upstream.outcome import (
    RETRY_AFTER_CEILING,
    backoff_delay,
    classify_response,
    forwarded_body,
    parse_retry_after,
)


def client(base_url: str, timeout: float = 5.0, key: str | None = "sk-up-0000") -> UpstreamClient:
    return UpstreamClient(base_url=base_url, api_key=key, timeout=timeout, pool_size=4)


def test_success_returns_the_upstream_json(fake_upstream: FakeUpstream) -> None:
    outcome = client(fake_upstream.base_url).complete(body("ping"))
    assert outcome.ok and outcome.response_json is not None
    assert json.loads(outcome.response_json)["choices"][0]["message"]["content"] == "echo: ping"


def test_success_json_is_kept_as_sent_and_must_be_strict() -> None:
    raw = b'{"id":  "x",\n "choices": []}'
    assert classify_response(200, raw, {}).response_json == raw.decode()
    for bad in [b'{"x": NaN}', b"[1]", b"\xff", b"not json"]:
        outcome = classify_response(200, bad, {})
        assert not outcome.ok and outcome.retryable


@pytest.mark.parametrize(
    "fake,kind,retryable,status",
    [
        ({"status": 400}, "upstream_error", False, 400),
        ({"status": 401}, "upstream_error", False, 401),
        ({"status": 404}, "upstream_error", False, 404),
        ({"status": 408}, "upstream_error", True, 408),
        ({"status": 409}, "upstream_error", True, 409),
        ({"status": 429}, "rate_limited", True, 429),
        ({"status": 429, "error_code": "insufficient_quota"}, "rate_limited", False, 429),
        ({"status": 500}, "upstream_error", True, 500),
        ({"status": 503}, "upstream_error", True, 503),
        ({"garbage": True}, "upstream_error", True, 200),
    ],
)
def test_failures_are_classified(
    fake_upstream: FakeUpstream, fake: dict[str, Any], kind: str, retryable: bool, status: int
) -> None:
    outcome = client(fake_upstream.base_url).complete(body(x_fake=fake))
    assert not outcome.ok
    assert outcome.error["type"] == kind
    assert outcome.retryable is retryable
    assert outcome.error["upstream_status"] == status


def test_retry_after_from_the_upstream_is_kept(fake_upstream: FakeUpstream) -> None:
    outcome = client(fake_upstream.base_url).complete(body(x_fake={"status": 429, "retry_after": "2"}))
    assert outcome.retry_after == 2.0


def test_timeout_is_a_retryable_timeout(fake_upstream: FakeUpstream) -> None:
    outcome = client(fake_upstream.base_url, timeout=0.2).complete(body(x_fake={"delay": 2}))
    assert outcome.error["type"] == "timeout" and outcome.retryable


def test_refused_connection_is_a_retryable_network_error() -> None:
    outcome = client(f"http://127.0.0.1:{free_port()}/v1").complete(body())
    assert outcome.error["type"] == "network_error" and outcome.retryable


def test_total_deadline_holds_against_a_trickling_server() -> None:
    # A server that accepts and sends nothing: the read timeout alone would wait per read.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        outcome = client(f"http://127.0.0.1:{port}/v1", timeout=0.3).complete(body())
    assert outcome.error["type"] == "timeout"


def test_forwarded_body_drops_proxy_and_stream_fields() -> None:
    sent = body(
        webhookUrl="https://h.example/", stream=True, stream_options={"include_usage": True}, seed=1, user="u"
    )
    assert forwarded_body(sent) == body(seed=1, user="u")


def test_no_authorization_header_without_an_upstream_key(fake_upstream: FakeUpstream) -> None:
    fake_upstream.reset()
    assert client(fake_upstream.base_url, key=None).complete(body()).ok
    assert fake_upstream.stats()["authorizations"] == [""]


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    date = formatdate(1_000_010, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=1_000_000) == pytest.approx(10.0)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, base=0.5, cap=8.0, rand=rng) for n in range(1, 8)]
    nominal = [0.5, 1, 2, 4, 8, 8, 8]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected * 0.75 <= delay <= expected
    assert len(set(delays)) > 1


def test_backoff_honours_a_usable_retry_after() -> None:
    assert backoff_delay(1, base=0.5, cap=8, retry_after=3.0) == 3.0
    assert backoff_delay(1, base=0.5, cap=8, retry_after=0.0) == 0.0
    too_long = backoff_delay(1, base=0.5, cap=8, retry_after=RETRY_AFTER_CEILING + 100)
    assert 6.0 <= too_long <= 8.0


def test_classify_429_insufficient_quota_by_type_too() -> None:
    outcome = classify_response(429, b'{"error": {"message": "no", "type": "insufficient_quota"}}', {})
    assert not outcome.retryable
