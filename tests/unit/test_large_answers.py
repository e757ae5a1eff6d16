"""Big and chatty answers cost linear work: the completion assembler and the SSE line splitter, and
the MAX_RESPONSE_BYTES setting that bounds them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from config import ConfigError, load_config
from llm_proxy.upstream.sse import CompletionAssembler, data_payloads


class Counted(str):
    """A piece of text that counts the characters each concatenation it takes part in copies.

    ``text + piece`` and ``text += piece`` call the subclass's ``__radd__`` first; ``"".join`` never
    does. Adding every piece to a growing string copies all of it each time: quadratic work."""

    copied = 0

    def __radd__(self, other: str) -> str:
        Counted.copied += len(other) + len(self)
        return str(other) + str(self)


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_the_assembler_copies_each_piece_of_content_once() -> None:
    Counted.copied = 0
    assembler = CompletionAssembler()
    assembler.add(chunk({"role": "assistant", "content": ""}))
    pieces = [Counted(f"{n:04d}") for n in range(20_000)]
    for piece in pieces:
        assembler.add(chunk({"content": piece}))
        assembler.add(chunk({"refusal": piece}))
    assembler.add(chunk({}, finish="stop"))
    message = assembler.completion()["choices"][0]["message"]
    expected = "".join(pieces)
    assert message == {"role": "assistant", "content": expected, "refusal": expected}
    # Adding to a growing string would have copied about 20,000**2 * 4 / 2 characters per field.
    assert Counted.copied <= 4 * len(expected)


def test_tool_call_names_and_arguments_are_copied_once_and_assembled_right() -> None:
    Counted.copied = 0
    assembler = CompletionAssembler()
    assembler.add(chunk({"role": "assistant", "content": None}))
    opening = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_", "arguments": ""}}
    assembler.add(chunk({"tool_calls": [opening]}))
    assembler.add(
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": Counted("look")}}]})
    )
    assembler.add(chunk({"tool_calls": [{"index": 1, "function": {"name": Counted("up")}}]}))
    assembler.add(chunk({"tool_calls": [{"index": 0, "function": {"name": Counted("weather")}}]}))
    values = [Counted(f"{n},") for n in range(10_000)]
    for value in values:
        # Parallel calls' pieces interleave, as they arrive.
        assembler.add(chunk({"tool_calls": [{"index": 0, "function": {"arguments": value}}]}))
        assembler.add(chunk({"tool_calls": [{"index": 1, "function": {"arguments": value}}]}))
    assembler.add(chunk({}, finish="tool_calls"))
    completion = assembler.completion()
    message = completion["choices"][0]["message"]
    arguments = "".join(values)
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": arguments}},
    ]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert Counted.copied <= 4 * (len(arguments) + 20)
    # Each call to completion() gives the same result, and what it returned is plain JSON.
    assert assembler.completion() == completion
    assert json.loads(json.dumps(completion)) == completion


def test_one_long_sse_line_in_tiny_pieces_is_split_in_linear_time() -> None:
    """2 MB in 16-byte pieces: 131,072 pieces. Re-scanning or re-splitting the whole buffer for each
    piece (the quadratic way) would take hours here; the splitter only looks at what is new."""
    payload = json.dumps({"content": "y" * (2 * 1024 * 1024)}).encode()
    stream = b": hello\ndata: " + payload + b"\n\ndata: [DONE]\n\n"
    pieces = [stream[i : i + 16] for i in range(0, len(stream), 16)]
    assert len(pieces) > 130_000
    assert list(data_payloads(pieces)) == [payload, b"[DONE]"]


def test_max_response_bytes_is_read_and_checked() -> None:
    assert load_config({}).max_response_bytes == 32 * 1024 * 1024
    assert load_config({"MAX_RESPONSE_BYTES": " 100000 "}).max_response_bytes == 100_000
    for bad in ["lots", "1.5", "-1", "1023"]:
        with pytest.raises(ConfigError, match="MAX_RESPONSE_BYTES"):
            load_config({"MAX_RESPONSE_BYTES": bad})
