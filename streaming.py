"""Streamed completions: relaying OpenAI's server-sent events and assembling what they said.

The worker makes the streamed upstream call and passes each event to the web process over a
per-request Unix stream connection (``RelayClient`` -> ``RelayServer``); the web writes them to the
waiting client. The worker also assembles the events into the ``chat.completion`` that is stored as
the request's result, like any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import gevent.queue
from gevent.server import StreamServer

from wakeup import address_for

log = logging.getLogger("llm_proxy.streaming")

RELAY = "relay"
_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


class CompletionAssembler:
    """Folds ``chat.completion.chunk`` objects into one ``chat.completion``."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None

    def add(self, chunk: dict[str, Any]) -> None:
        for name in _HEAD_FIELDS:
            if name in chunk and name not in self._head:
                self._head[name] = chunk[name]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            index = int(part.get("index", 0))
            choice = self._choices.setdefault(
                index,
                {"index": index, "message": {"role": "assistant", "content": None}, "finish_reason": None},
            )
            delta = part.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            for text_field in ("content", "refusal"):
                if delta.get(text_field) is not None:
                    message[text_field] = (message.get(text_field) or "") + delta[text_field]
            for call in delta.get("tool_calls") or []:
                calls = message.setdefault("tool_calls", [])
                position = int(call.get("index", 0))
                while len(calls) <= position:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                target = calls[position]
                if call.get("id"):
                    target["id"] = call["id"]
                if call.get("type"):
                    target["type"] = call["type"]
                function = call.get("function") or {}
                target["function"]["name"] += function.get("name") or ""
                target["function"]["arguments"] += function.get("arguments") or ""
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]

    def completion(self) -> dict[str, Any]:
        result: dict[str, Any] = {**self._head, "object": "chat.completion"}
        result["choices"] = [self._choices[i] for i in sorted(self._choices)]
        if self._usage is not None:
            result["usage"] = self._usage
        return result


def completion_as_events(completion: dict[str, Any]) -> bytes:
    """A stored completion as a short event stream (when it could not be relayed as it came)."""
    head = {k: completion[k] for k in _HEAD_FIELDS if k in completion}
    events = []
    for choice in completion.get("choices") or []:
        delta = {k: v for k, v in (choice.get("message") or {}).items() if v is not None}
        for position, call in enumerate(delta.get("tool_calls") or []):
            call["index"] = position
        events.append(
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}],
            }
        )
        events.append(
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": choice.get("index", 0),
                        "delta": {},
                        "finish_reason": choice.get("finish_reason"),
                    }
                ],
            }
        )
    if completion.get("usage"):
        events.append(
            {**head, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]}
        )
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


class RelayServer:
    """In the web process: accepts the worker's relay connections, one per streamed request."""

    def __init__(self, data_dir: Path) -> None:
        self._sinks: dict[str, gevent.queue.Queue[bytes | None]] = {}
        self._server: StreamServer | None = None
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address_for(data_dir, RELAY))
            listener.listen(128)
            self._server = StreamServer(listener, self._handle)
        except OSError as exc:
            log.warning("no relay socket (%s); streamed answers arrive whole", exc)

    def start(self) -> None:
        if self._server is not None:
            self._server.start()

    def open(self, request_id: str) -> gevent.queue.Queue[bytes | None]:
        """Where the events of this request will arrive; None once its relay ends."""
        sink: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        self._sinks[request_id] = sink
        return sink

    def close_sink(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)

    def _handle(self, connection: socket.socket, _address: Any) -> None:
        reader = connection.makefile("rb")
        sink = None
        try:
            request_id = reader.readline(256).strip().decode("ascii", "replace")
            sink = self._sinks.get(request_id)
            for line in iter(reader.readline, b""):
                if sink is not None:
                    sink.put(line)
        except OSError:
            pass
        finally:
            if sink is not None:
                sink.put(None)
            reader.close()
            connection.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=1)


class RelayClient:
    """In the worker: opens the relay connection of one request on its first event."""

    def __init__(self, data_dir: Path, request_id: str) -> None:
        self._address = address_for(data_dir, RELAY)
        self._request_id = request_id
        self._sock: socket.socket | None = None
        self._broken = False

    def send(self, event: bytes) -> None:
        """Best effort: a client that went away must not stop the request itself."""
        if self._broken:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(10)
                self._sock.connect(self._address)
                self._sock.sendall(self._request_id.encode("ascii") + b"\n")
            self._sock.sendall(event)
        except OSError:
            self._broken = True
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
