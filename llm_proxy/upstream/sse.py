"""Server-sent events of a streamed chat completion: split into lines, assembled into the
``chat.completion`` stored as the request's result, and replayed from a stored one.

Pure functions and classes: the I/O is in ``client``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def data_payloads(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The payload of each ``data:`` line, from the stream's bytes in pieces of any size. Lines
    are found by scanning, not by re-splitting the buffer, so a long line costs linear time."""
    buffer = bytearray()
    for piece in pieces:
        searched = len(buffer)  # what is already buffered holds no newline
        buffer += piece
        begin = 0
        newline = buffer.find(b"\n", searched)
        while newline != -1:
            line = bytes(buffer[begin:newline]).rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip()
            begin = newline + 1
            newline = buffer.find(b"\n", begin)
        del buffer[:begin]


class CompletionAssembler:
    """Folds ``chat.completion.chunk`` objects into one ``chat.completion``.

    Text (content, refusal, a tool call's name and arguments) is kept as a list of its pieces and
    joined once in ``completion``: adding each piece to a growing string copies all of it every
    time, quadratic in the answer's length (20,000 chunks of 500 bytes took 36 s of CPU).
    """

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
                    if message.get(text_field) is None:
                        message[text_field] = []
                    message[text_field].append(delta[text_field])
            for call in delta.get("tool_calls") or []:
                calls = message.setdefault("tool_calls", [])
                position = int(call.get("index", 0))
                while len(calls) <= position:
                    calls.append({"id": None, "type": "function", "function": {"name": [], "arguments": []}})
                target = calls[position]
                if call.get("id"):
                    target["id"] = call["id"]
                if call.get("type"):
                    target["type"] = call["type"]
                function = call.get("function") or {}
                for part_name in ("name", "arguments"):
                    if function.get(part_name):
                        target["function"][part_name].append(function[part_name])
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]

    def completion(self) -> dict[str, Any]:
        result: dict[str, Any] = {**self._head, "object": "chat.completion"}
        result["choices"] = [_joined_choice(self._choices[i]) for i in sorted(self._choices)]
        if self._usage is not None:
            result["usage"] = self._usage
        return result


def _joined_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice as the assembler keeps it (text as lists of pieces), with its text joined."""
    message: dict[str, Any] = {}
    for name, value in choice["message"].items():
        if name == "tool_calls":
            message[name] = [
                {
                    **call,
                    "function": {part: "".join(pieces) for part, pieces in call["function"].items()},
                }
                for call in value
            ]
        elif isinstance(value, list):
            message[name] = "".join(value)
        else:
            message[name] = value
    return {**choice, "message": message}


def completion_as_events(completion: dict[str, Any]) -> bytes:
    """A stored completion as a short event stream (when it could not be relayed as it came)."""
    head = {k: completion[k] for k in _HEAD_FIELDS if k in completion}
    events = []
    for choice in completion.get("choices") or []:
        delta = {k: v for k, v in (choice.get("message") or {}).items() if v is not None}
        if delta.get("tool_calls"):
            # Copies: the stored completion stays as it was.
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(delta["tool_calls"])]
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
