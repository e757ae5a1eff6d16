"""Wait-mode streaming: the events a worker relays, written to the client as they arrive."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from bottle import HTTPResponse

from llm_proxy.api.answers import error_object, event_stream, final_answer
from llm_proxy.api.service import RequestService
from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.storage.base import RelaySink, WebSignals
from llm_proxy.upstream.sse import as_events


def replayed_stream(
    entry: StatusEntry, headers: dict[str, str], endpoint: Endpoint = Endpoint.CHAT
) -> HTTPResponse:
    """A stored result as an event stream (its live events are gone, its result is not)."""
    return event_stream(headers, [as_events(endpoint, json.loads(entry.response_json or "{}"))])


RELAY_SETTLE = 1.0
"""How long a stream that relayed events still reads its relay once the request is final: the
worker ends the relay before it stores the final state, but the two travel different ways (the
embedded back end), so the announcement may overtake the last events."""


@runtime_checkable
class Wakeable(Protocol):
    def wake(self) -> None: ...


class WatchedSink(RelaySink):
    """A streamed request's relay sink that also wakes when the request becomes final, so a
    stream waits on "next event or final state" rather than on a timer. Open it before the job
    is queued: then neither an event nor the final state can slip by unseen."""

    def __init__(self, service: RequestService, signals: WebSignals, request_id: str) -> None:
        self._sink = signals.open_relay(request_id)
        wakeable = self._sink
        # Sinks that cannot be woken still work, each wait lasting its full timeout.
        self._stop = (
            service.on_final(request_id, wakeable.wake) if isinstance(wakeable, Wakeable) else _nothing
        )

    def next(self, timeout: float) -> bytes | None:
        return self._sink.next(timeout)

    def close(self) -> None:
        self._stop()
        self._sink.close()


def _nothing() -> None:
    pass


def _first_event(
    service: RequestService, request_id: str, sink: RelaySink, hold: float
) -> bytes | StatusEntry:
    """The first relayed event; or the request's final entry if it ended before one; or b"" if
    neither happened within ``hold`` seconds."""
    deadline = time.monotonic() + hold
    while True:
        item = sink.next(max(0.0, deadline - time.monotonic()))
        if item:
            return item
        # b"": woken by the final state, or the hold is over; None: an attempt's relay ended
        # without an event (a Postgres relay ends with each attempt), and a retry may follow.
        found = service.lookup_quietly(request_id)
        if found is not None and found.entry.status.final:
            return found.entry
        if time.monotonic() >= deadline:
            return b""


def stream_answer(
    service: RequestService,
    request_id: str,
    sink: RelaySink,
    headers: dict[str, str],
    *,
    hold: float,
    keepalive: float,
    wait_max: float,
    endpoint: Endpoint = Endpoint.CHAT,
) -> HTTPResponse:
    """The answer of a streamed wait-mode submit; the returned stream closes ``sink`` when it
    ends, and so does this function when it answers otherwise."""
    # The 200 is held back until the first event, so that a failure before it (the upstream
    # refusing the request, or failing every retry) is a real HTTP error the SDK can raise, sent
    # as soon as the request is final.
    try:
        first = _first_event(service, request_id, sink, hold)
    except BaseException:
        sink.close()
        raise
    if isinstance(first, StatusEntry):
        sink.close()
        if first.status is not Status.COMPLETED:
            return final_answer(first, headers)
        return replayed_stream(first, headers, endpoint)
    head: bytes = first
    # The Responses API's stream ends with its response.completed event, the others with [DONE].
    done = b"" if endpoint is Endpoint.RESPONSES else b"data: [DONE]\n\n"

    def events() -> Iterator[bytes]:
        relayed = bool(head)
        settling = False
        try:
            if head:
                yield head
            while True:
                item = sink.next(RELAY_SETTLE if settling else keepalive)
                if item:
                    relayed = True
                    yield item
                    continue
                if item is None and relayed:
                    break  # the relay ended after events: such an attempt is never retried
                found = service.lookup_quietly(request_id)
                if found is not None and found.entry.status.final:
                    if not relayed or settling:
                        break  # told below, from the stored result
                    settling = True
                    continue
                if item is not None:
                    # Comments keep proxies (Heroku's router cuts at 30 s of silence) from closing it.
                    yield b": keep-alive\n\n"
            found = service.await_final(request_id, wait_max)
            if found is not None and found.entry.status is Status.COMPLETED:
                if not relayed:
                    yield as_events(endpoint, json.loads(found.entry.response_json or "{}"))
                elif done:
                    yield done
            else:
                error = error_object(found.entry if found else None)
                yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        finally:
            sink.close()

    return event_stream(headers, events())
