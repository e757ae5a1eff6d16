"""Wait-mode streaming: the events a worker relays, written to the client as they arrive."""

from __future__ import annotations

import json
from collections.abc import Iterator

from bottle import HTTPResponse

from llm_proxy.api.answers import error_object, event_stream, final_answer
from llm_proxy.api.service import RequestService
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.storage.base import RelaySink
from llm_proxy.upstream.sse import completion_as_events


def replayed_stream(entry: StatusEntry, headers: dict[str, str]) -> HTTPResponse:
    """A stored completion as an event stream (its live events are gone, its result is not)."""
    return event_stream(headers, [completion_as_events(json.loads(entry.response_json or "{}"))])


def stream_answer(
    service: RequestService,
    request_id: str,
    sink: RelaySink,
    headers: dict[str, str],
    *,
    hold: float,
    keepalive: float,
    wait_max: float,
) -> HTTPResponse:
    """The answer of a streamed wait-mode submit; the returned stream closes ``sink`` when it
    ends, and so does this function when it answers otherwise."""
    # The 200 is held back a little, so that a failure before the first event (the upstream
    # refusing the request, say) is still a real HTTP error the SDK can raise.
    first = sink.next(hold)
    if not first:
        found = service.lookup_quietly(request_id)
        if found is not None and found.entry.status.final:
            sink.close()
            if found.entry.status is not Status.COMPLETED:
                return final_answer(found.entry, headers)
            return replayed_stream(found.entry, headers)

    def events() -> Iterator[bytes]:
        relayed = bool(first)
        try:
            if first:
                yield first
            while True:
                item = sink.next(keepalive)
                if item is None:
                    break
                if item:
                    relayed = True
                    yield item
                    continue
                found = service.lookup_quietly(request_id)
                if found is not None and found.entry.status.final:
                    break  # finished, and the relay's end (or the whole relay) went missing: told below
                # Comments keep proxies (Heroku's router cuts at 30 s of silence) from closing it.
                yield b": keep-alive\n\n"
            found = service.await_final(request_id, wait_max)
            if found is not None and found.entry.status is Status.COMPLETED:
                yield (
                    b"data: [DONE]\n\n"
                    if relayed
                    else completion_as_events(json.loads(found.entry.response_json or "{}"))
                )
            else:
                error = error_object(found.entry if found else None)
                yield b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
        finally:
            sink.close()

    return event_stream(headers, events())
