"""Server-sent events of a streamed answer: split into events, assembled into the object stored
as the request's result (a ``chat.completion``, a ``text_completion``, a Responses API
``response``), and replayed from a stored one.

Pure functions and classes: the I/O is in ``client``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from llm_proxy.domain.endpoints import Endpoint

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


@dataclass(frozen=True)
class Event:
    """One server-sent event: its ``event:`` name, if any, and its data lines joined."""

    name: bytes | None
    data: bytes

    @property
    def raw(self) -> bytes:
        """The event as relayed: its name and data as sent (``id:``, ``retry:`` and comments are
        the upstream connection's own business and stay behind)."""
        head = b"event: " + self.name + b"\n" if self.name else b""
        return head + b"".join(b"data: " + line + b"\n" for line in self.data.split(b"\n")) + b"\n"


def sse_events(pieces: Iterable[bytes]) -> Iterator[Event]:
    """The events of a stream in pieces of any size, each once its blank line (or the stream's
    end) arrives; events without data (comments, keep-alives) are skipped. Lines are found by
    scanning, as in ``data_payloads``, so a long line costs linear time."""
    buffer = bytearray()
    name: bytes | None = None
    data: list[bytes] = []
    for piece in pieces:
        searched = len(buffer)
        buffer += piece
        begin = 0
        newline = buffer.find(b"\n", searched)
        while newline != -1:
            line = bytes(buffer[begin:newline]).rstrip(b"\r")
            begin = newline + 1
            newline = buffer.find(b"\n", begin)
            if not line:
                if data:
                    yield Event(name, b"\n".join(data))
                name, data = None, []
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif line.startswith(b"event:"):
                name = line[6:].strip() or None
        del buffer[:begin]
    tail = bytes(buffer).rstrip(b"\r")
    if tail.startswith(b"data:"):
        data.append(tail[5:].strip())
    if data:
        yield Event(name, b"\n".join(data))


class Assembler(Protocol):
    """Folds a stream's events into the object the same call would have answered unstreamed."""

    @property
    def done(self) -> bool:
        """The stream's final event came (streams that end with ``[DONE]`` never say so here)."""
        ...

    def failure(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The error object of an event that reports the call failed; None for any other."""
        ...

    def add(self, chunk: dict[str, Any]) -> None: ...

    def completion(self) -> dict[str, Any]: ...


def assembler_for(endpoint: Endpoint) -> Assembler:
    if endpoint is Endpoint.RESPONSES:
        return ResponseAssembler()
    if endpoint is Endpoint.COMPLETIONS:
        return TextCompletionAssembler()
    return CompletionAssembler()


def _error_of(chunk: dict[str, Any]) -> dict[str, Any] | None:
    error = chunk.get("error")
    return error if isinstance(error, dict) else None


class _ChoicesAssembler(ABC):
    """What the chat and legacy completion assemblers share: the head fields from the first chunk
    that has them, the last usage, and choices by index folded by ``_fold``."""

    done = False

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None

    def failure(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        return _error_of(chunk)

    def add(self, chunk: dict[str, Any]) -> None:
        for name in _HEAD_FIELDS:
            if name in chunk and name not in self._head:
                self._head[name] = chunk[name]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for part in chunk.get("choices") or []:
            index = int(part.get("index", 0))
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = self._new_choice(index)
            self._fold(choice, part)
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]

    def _result(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {**self._head, "object": kind, "choices": choices}
        if self._usage is not None:
            result["usage"] = self._usage
        return result

    @abstractmethod
    def _new_choice(self, index: int) -> dict[str, Any]: ...

    @abstractmethod
    def _fold(self, choice: dict[str, Any], part: dict[str, Any]) -> None:
        """One chunk's part for this choice (its finish reason is taken care of)."""


class CompletionAssembler(_ChoicesAssembler):
    """Folds ``chat.completion.chunk`` objects into one ``chat.completion``.

    Text (content, refusal, a tool call's name and arguments) is kept as a list of its pieces and
    joined once in ``completion``: adding each piece to a growing string copies all of it every
    time, quadratic in the answer's length (20,000 chunks of 500 bytes took 36 s of CPU).
    """

    def _new_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": None}, "finish_reason": None}

    def _fold(self, choice: dict[str, Any], part: dict[str, Any]) -> None:
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

    def completion(self) -> dict[str, Any]:
        return self._result(
            "chat.completion", [_joined_choice(self._choices[i]) for i in sorted(self._choices)]
        )


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


class TextCompletionAssembler(_ChoicesAssembler):
    """Folds legacy ``text_completion`` chunks (``POST /v1/completions`` streamed) into one
    ``text_completion``; text kept in pieces and joined once, as in ``CompletionAssembler``."""

    def _new_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "text": [], "logprobs": None, "finish_reason": None}

    def _fold(self, choice: dict[str, Any], part: dict[str, Any]) -> None:
        if isinstance(part.get("text"), str):
            choice["text"].append(part["text"])
        logprobs = part.get("logprobs")
        if isinstance(logprobs, dict):
            # Each chunk's logprobs cover its own tokens: the whole answer's are their lists joined.
            merged = choice["logprobs"] = choice["logprobs"] or {}
            for name, value in logprobs.items():
                if isinstance(value, list):
                    merged.setdefault(name, []).extend(value)
                else:
                    merged[name] = value

    def completion(self) -> dict[str, Any]:
        return self._result(
            "text_completion",
            [{**self._choices[i], "text": "".join(self._choices[i]["text"])} for i in sorted(self._choices)],
        )


_RESPONSE_ENDS = ("response.completed", "response.incomplete")


class ResponseAssembler:
    """The Responses API streams typed events whose last one (``response.completed``, or
    ``response.incomplete`` when a limit cut the answer short) carries the whole ``response``
    object: that object is the result, nothing is pieced together."""

    def __init__(self) -> None:
        self._response: dict[str, Any] = {}
        self.done = False

    def failure(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        kind = chunk.get("type")
        if kind == "error":
            return {
                "message": chunk.get("message") or "the upstream's stream reported an error",
                "type": "server_error",
                "code": chunk.get("code"),
                "param": chunk.get("param"),
            }
        if kind == "response.failed":
            response = chunk.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            if isinstance(error, dict):
                return {"message": error.get("message") or "the response failed", **error}
            return {"message": "the response failed", "type": "server_error"}
        return _error_of(chunk)

    def add(self, chunk: dict[str, Any]) -> None:
        response = chunk.get("response")
        if isinstance(response, dict):
            # Every lifecycle event (created, in_progress, ...) holds the response so far.
            self._response = response
        if chunk.get("type") in _RESPONSE_ENDS:
            self.done = True

    def completion(self) -> dict[str, Any]:
        return self._response


def as_events(endpoint: Endpoint, stored: dict[str, Any]) -> bytes:
    """A stored result as the short event stream its endpoint would have sent."""
    if endpoint is Endpoint.RESPONSES:
        return response_as_events(stored)
    if endpoint is Endpoint.COMPLETIONS:
        return text_completion_as_events(stored)
    return completion_as_events(stored)


def text_completion_as_events(completion: dict[str, Any]) -> bytes:
    head = {k: completion[k] for k in _HEAD_FIELDS if k in completion}
    events = [
        {**head, "object": "text_completion", "choices": [choice]}
        for choice in completion.get("choices") or []
    ]
    if completion.get("usage"):
        events.append({**head, "object": "text_completion", "choices": [], "usage": completion["usage"]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


_FINAL_ONLY = ("usage", "completed_at", "incomplete_details", "error")
_CALLS_BY_CALL_ID = ("function_call", "custom_tool_call", "shell_call", "shell_call_output")


def response_as_events(response: dict[str, Any]) -> bytes:
    """A stored ``response`` as the typed events the Responses API streams: each output item
    opened, its text (or refusal, reasoning summary, or a function call's arguments) as one delta,
    closed, then ``response.completed`` with the response whole. Clients read either the deltas
    or the last event, and the SDK's ``responses.stream`` folds the events in order, so both must
    agree: an output it could not fold (items without ids, or two with one identity, as some
    compatible upstreams send) is told by the first and last events alone."""
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append((kind, {"type": kind, **fields}))

    started = {**response, "status": "in_progress", "output": [], **dict.fromkeys(_FINAL_ONLY)}
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    output = response.get("output") or []
    if _foldable(output):
        for output_index, item in enumerate(output):
            _item_events(emit, output_index, item)
    last = "response.incomplete" if response.get("status") == "incomplete" else "response.completed"
    emit(last, response=response)
    return b"".join(
        Event(kind.encode(), json.dumps({**payload, "sequence_number": number}).encode()).raw
        for number, (kind, payload) in enumerate(events)
    )


def _foldable(output: Any) -> bool:
    """Whether each item (and each of its parts) can be told apart as the SDK tells them: by
    type and id, or by ``call_id`` for calls."""
    if not isinstance(output, list):
        return False
    seen = set()
    for item in output:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return False
        kind = item.get("type")
        identity = (
            (kind, None, item.get("call_id")) if kind in _CALLS_BY_CALL_ID else (kind, item["id"], None)
        )
        if identity in seen:
            return False
        seen.add(identity)
        parts = [*(item.get("content") or []), *(item.get("summary") or [])]
        if not all(isinstance(part, dict) for part in parts):
            return False
    return True


class _Emit(Protocol):
    def __call__(self, kind: str, **fields: Any) -> None: ...


def _item_events(emit: _Emit, output_index: int, item: dict[str, Any]) -> None:
    kind = item.get("type")
    where = {"item_id": item["id"], "output_index": output_index}
    if kind == "message":
        emit(
            "response.output_item.added",
            output_index=output_index,
            item={**item, "status": "in_progress", "content": []},
        )
        for content_index, part in enumerate(item.get("content") or []):
            _part_events(emit, {**where, "content_index": content_index}, part)
    elif kind == "function_call":
        emit(
            "response.output_item.added",
            output_index=output_index,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        arguments = item.get("arguments") or ""
        emit("response.function_call_arguments.delta", **where, delta=arguments)
        emit("response.function_call_arguments.done", **where, name=item.get("name"), arguments=arguments)
    elif kind == "reasoning":
        opened = {**item, "summary": []}
        if "status" in item:
            opened["status"] = "in_progress"
        if "content" in item:
            opened["content"] = []
        emit("response.output_item.added", output_index=output_index, item=opened)
        _reasoning_events(emit, where, item)
    else:
        # Tool calls run by the upstream, ...: opened and closed whole.
        emit("response.output_item.added", output_index=output_index, item=item)
    emit("response.output_item.done", output_index=output_index, item=item)


def _part_events(emit: _Emit, where: dict[str, Any], part: dict[str, Any]) -> None:
    kind = part.get("type")
    if kind == "output_text":
        text = part.get("text") or ""
        logprobs = part.get("logprobs") or []
        emit(
            "response.content_part.added",
            **where,
            part={**part, "text": "", "annotations": [], "logprobs": []},
        )
        emit("response.output_text.delta", **where, delta=text, logprobs=logprobs)
        for number, annotation in enumerate(part.get("annotations") or []):
            emit(
                "response.output_text.annotation.added",
                **where,
                annotation_index=number,
                annotation=annotation,
            )
        emit("response.output_text.done", **where, text=text, logprobs=logprobs)
    elif kind == "refusal":
        refusal = part.get("refusal") or ""
        emit("response.content_part.added", **where, part={**part, "refusal": ""})
        emit("response.refusal.delta", **where, delta=refusal)
        emit("response.refusal.done", **where, refusal=refusal)
    else:
        emit("response.content_part.added", **where, part=part)
    emit("response.content_part.done", **where, part=part)


def _reasoning_events(emit: _Emit, where: dict[str, Any], item: dict[str, Any]) -> None:
    for summary_index, part in enumerate(item.get("summary") or []):
        at = {**where, "summary_index": summary_index}
        text = part.get("text") or ""
        emit("response.reasoning_summary_part.added", **at, part={**part, "text": ""})
        emit("response.reasoning_summary_text.delta", **at, delta=text)
        emit("response.reasoning_summary_text.done", **at, text=text)
        emit("response.reasoning_summary_part.done", **at, part=part)
    for content_index, part in enumerate(item.get("content") or []):
        at = {**where, "content_index": content_index}
        text = part.get("text") or ""
        emit("response.reasoning_text.delta", **at, delta=text)
        emit("response.reasoning_text.done", **at, text=text)
