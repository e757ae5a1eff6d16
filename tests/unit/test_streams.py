"""The wait-mode stream loop on its own: it wakes on the request's final state, not on a timer, and
never drops relayed events when the final state is announced ahead of them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest

from llm_proxy.api.service import Found
from llm_proxy.api.streams import WatchedSink, stream_answer
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.storage.local import QueueSink, Sinks

REQUEST_ID = "chatreq_streamtest0000000"
# Far longer than any test may take: a wait that is not woken fails the test instead.
LONG = 60.0


class Requests:
    """The part of RequestService a stream uses, with the request's state set by the test."""

    def __init__(self) -> None:
        self.entry: StatusEntry | None = None
        self.final = gevent.event.Event()
        self.callbacks: list[Callable[[], None]] = []
        self.stopped = 0

    def lookup_quietly(self, request_id: str) -> Found | None:
        return Found(self.entry, None) if self.entry else None

    def await_final(self, request_id: str, seconds: float) -> Found | None:
        self.final.wait(seconds)
        return self.lookup_quietly(request_id)

    def on_final(self, request_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        self.callbacks.append(callback)

        def stop() -> None:
            self.stopped += 1

        return stop

    def finish(self, entry: StatusEntry) -> None:
        self.entry = entry
        self.final.set()
        for callback in self.callbacks:
            callback()


class Signals:
    def __init__(self) -> None:
        self.sinks = Sinks()

    def open_relay(self, request_id: str) -> QueueSink:
        return self.sinks.open(request_id)

    def queue(self) -> Any:
        sink = self.sinks.get(REQUEST_ID)
        assert sink is not None
        return sink.queue


def entry(status: Status, **fields: Any) -> StatusEntry:
    return StatusEntry(status=status, request_json="{}", owner="o", timestamp=0, **fields)


def event(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


COMPLETION = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ab"}, "finish_reason": "stop"}],
    }
)
FAILED = entry(
    Status.ERROR,
    error={
        "message": "bad",
        "type": "upstream_error",
        "upstream_status": 400,
        "attempts": 1,
        "upstream_error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None},
    },
)


@pytest.fixture
def parts() -> tuple[Any, Requests, Signals]:
    service, signals = Requests(), Signals()
    sink = WatchedSink(service, signals, REQUEST_ID)  # type: ignore[arg-type]
    return sink, service, signals


def answer(sink: Any, service: Requests) -> Any:
    return stream_answer(
        service,  # type: ignore[arg-type]
        REQUEST_ID,
        sink,
        {"X-Request-Id": REQUEST_ID},
        hold=LONG,
        keepalive=LONG,
        wait_max=LONG,
    )


def test_a_failure_before_the_first_event_is_answered_when_it_is_final(
    parts: tuple[Any, Requests, Signals],
) -> None:
    sink, service, signals = parts
    gevent.spawn_later(0.05, service.finish, FAILED)
    with gevent.Timeout(5):
        reply = answer(sink, service)
    assert reply.status_code == 400 and json.loads(reply.body)["error"]["message"] == "bad"
    assert reply.headers["x-should-retry"] == "false"
    assert signals.sinks.get(REQUEST_ID) is None and service.stopped == 1


def test_events_the_final_state_overtook_are_still_relayed(parts: tuple[Any, Requests, Signals]) -> None:
    sink, service, signals = parts
    queue = signals.queue()
    queue.put(event("a"))
    with gevent.Timeout(5):
        reply = answer(sink, service)
        assert reply.status_code == 200
        body = iter(reply.body)
        assert next(body) == event("a")
        # Announced before the last event and the relay's end came through.
        service.finish(entry(Status.COMPLETED, response_json=COMPLETION))
        gevent.spawn_later(0.05, lambda: (queue.put(event("b")), queue.put(None)))
        rest = list(body)
    assert rest == [event("b"), b"data: [DONE]\n\n"]
    assert signals.sinks.get(REQUEST_ID) is None and service.stopped == 1


def test_an_attempt_that_relayed_nothing_is_not_the_end_of_the_stream(
    parts: tuple[Any, Requests, Signals],
) -> None:
    sink, service, signals = parts
    queue = signals.queue()
    with gevent.Timeout(5):
        # Postgres ends each attempt's relay; the retry's events follow.
        gevent.spawn_later(0.05, lambda: (queue.put(None), queue.put(event("a")), queue.put(None)))
        reply = answer(sink, service)
        gevent.spawn_later(0.05, service.finish, entry(Status.COMPLETED, response_json=COMPLETION))
        assert list(reply.body) == [event("a"), b"data: [DONE]\n\n"]
