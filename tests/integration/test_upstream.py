"""The upstream client against the fake upstream over loopback, and the retry policy's arithmetic."""

from __future__ import annotations

import json
import random
import socket
import time
from email.utils import formatdate
from typing import Any

import gevent
import gevent.event
import pytest

from conftest import FakeUpstream, body, free_port, wait_until
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


# Big, endless and chatty answers: read under MAX_RESPONSE_BYTES and the deadline, never holding
# the other greenlets up.


class Ticker:
    """A greenlet that wants a turn every millisecond and keeps the longest wait for one."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._last = time.monotonic()
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            gevent.sleep(0.001)
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self._last)
        self._last = now

    def stop(self) -> float:
        # Also the wait still going on: a greenlet that never had a turn never measured one.
        self._tick()
        self._greenlet.kill()
        return self.longest


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_over_the_cap_is_response_too_large_and_not_read_whole(
    fake_upstream: FakeUpstream, chunked: bool
) -> None:
    fake_upstream.reset()
    key = f"huge-{chunked}"
    capped = UpstreamClient(
        base_url=fake_upstream.base_url, api_key=None, timeout=30, pool_size=1, max_response_bytes=1_000_000
    )
    outcome = capped.complete(body(x_fake={"key": key, "huge": 200_000_000, "chunked": chunked}))
    assert outcome.error["type"] == "response_too_large" and not outcome.retryable
    assert "1000000" in outcome.error["message"]
    # The fake stops when a send fails: what it got out is the cap plus what socket buffers hold.
    wait_until(lambda: key in fake_upstream.stats()["finished"])
    stats = fake_upstream.stats()
    assert stats["finished"][key] is False
    assert stats["sent"][key] < 50_000_000


def test_an_over_cap_content_length_is_refused_without_reading_the_body() -> None:
    """The server announces a huge body and sends none of it: waiting for it would be a timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    done = gevent.event.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{"
            )
            done.wait(30)

    server = gevent.spawn(serve)
    try:
        capped = UpstreamClient(
            base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
            api_key=None,
            timeout=20,
            pool_size=1,
            max_response_bytes=1_000_000,
        )
        started = time.monotonic()
        outcome = capped.complete(body())
        assert outcome.error["type"] == "response_too_large"
        assert time.monotonic() - started < 5
    finally:
        done.set()
        server.join(5)
        listener.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_answer_under_the_cap_arrives_whole_and_the_connection_is_reused(
    fake_upstream: FakeUpstream, chunked: bool
) -> None:
    fake_upstream.reset()
    upstream = client(fake_upstream.base_url)
    ticker = Ticker()
    outcomes = [upstream.complete(body(x_fake={"huge": 4_000_000, "chunked": chunked})) for _ in range(3)]
    longest = ticker.stop()
    for outcome in outcomes:
        assert outcome.response_json is not None
        assert json.loads(outcome.response_json)["choices"][0]["message"]["content"] == "x" * 4_000_000
    assert longest < 0.25
    # A body read to its end leaves its connection good for the next call.
    assert len(fake_upstream.stats()["client_ports"]) == 1


def test_a_fast_endless_stream_ends_at_the_deadline_and_other_greenlets_keep_running(
    fake_upstream: FakeUpstream,
) -> None:
    """A flood that never lets a read block: only the client's own checks can end it on time."""
    unbounded = UpstreamClient(
        base_url=fake_upstream.base_url, api_key=None, timeout=0.5, pool_size=1, max_response_bytes=10**12
    )
    ticker = Ticker()
    started = time.monotonic()
    outcome = unbounded.stream(body(stream=True, x_fake={"endless": 20}), lambda event: None)
    elapsed = time.monotonic() - started
    longest = ticker.stop()
    assert outcome.error["type"] == "timeout"
    assert elapsed < 2.5
    assert longest < 0.25


def test_relayed_events_count_against_the_cap(fake_upstream: FakeUpstream) -> None:
    capped = UpstreamClient(
        base_url=fake_upstream.base_url, api_key=None, timeout=30, pool_size=1, max_response_bytes=100_000
    )
    relayed: list[bytes] = []
    outcome = capped.stream(body(stream=True, x_fake={"chunks": 5_000, "piece": "y" * 100}), relayed.append)
    assert outcome.error["type"] == "response_too_large"
    assert outcome.relayed and not outcome.retryable
    assert 50_000 < sum(len(event) for event in relayed) <= 100_000


def test_a_chatty_stream_of_many_small_chunks_is_relayed_and_assembled(fake_upstream: FakeUpstream) -> None:
    relayed: list[bytes] = []
    outcome = client(fake_upstream.base_url, timeout=60).stream(
        body(stream=True, x_fake={"chunks": 20_000, "piece": "ab"}), relayed.append
    )
    assert outcome.response_json is not None
    assert json.loads(outcome.response_json)["choices"][0]["message"]["content"] == "ab" * 20_000
    assert len(relayed) == 20_002  # the role, each piece, the finish reason


def test_a_stream_ended_by_closing_the_connection_relays_each_event_as_it_arrives(
    fake_upstream: FakeUpstream,
) -> None:
    """No chunked encoding and no length: a read that waits for 8 KB or the end would hold every
    event back until the connection closes."""
    arrivals: list[float] = []
    started = time.monotonic()
    outcome = client(fake_upstream.base_url).stream(
        body("a b c d", stream=True, x_fake={"close_delimited": True, "chunk_delay": 0.4}),
        lambda event: arrivals.append(time.monotonic() - started),
    )
    assert outcome.response_json is not None
    assert json.loads(outcome.response_json)["choices"][0]["message"]["content"] == "echo: a b c d"
    # Five pauses of 0.4 s sit between the first event and the last.
    assert arrivals[-1] - arrivals[0] > 1.2
    assert arrivals[1] - arrivals[0] < arrivals[-1] - arrivals[0] - 0.8
