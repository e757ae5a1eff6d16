"""Server-sent events of a streamed completion: lines found across any piece boundaries, chunks
folded into one ``chat.completion``, and a stored completion replayed as events."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from llm_proxy.upstream.sse import CompletionAssembler, completion_as_events, data_payloads

# Every kind of line a stream can carry: LF and CRLF endings, comments, other fields, blank lines,
# ``data:`` with and without a space, and the terminator.
STREAM = (
    b": keep-alive comment\n"
    b"event: message\r\n"
    b'data: {"a": 1}\r\n'
    b"\r\n"
    b"id: 7\n"
    b'data:{"b": 2}\n'
    b"\n"
    b"retry: 1000\n"
    b'data:   {"c": "x y"}  \r\n'
    b"\n"
    b"database: not a data field\n"
    b"data: [DONE]\n"
    b"\n"
)
EXPECTED = [b'{"a": 1}', b'{"b": 2}', b'{"c": "x y"}', b"[DONE]"]


def pieces_at(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in [*cuts, len(data)]:
        yield data[start:cut]
        start = cut


def test_data_payloads_of_a_whole_stream() -> None:
    assert list(data_payloads([STREAM])) == EXPECTED


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_data_payloads_split_at_any_one_boundary(cut: int) -> None:
    assert list(data_payloads(pieces_at(STREAM, [cut]))) == EXPECTED


def test_data_payloads_split_at_every_pair_of_boundaries() -> None:
    for first in range(len(STREAM) + 1):
        for second in range(first, len(STREAM) + 1):
            got = list(data_payloads(pieces_at(STREAM, [first, second])))
            assert got == EXPECTED, (first, second)


def test_data_payloads_byte_by_byte_with_empty_pieces() -> None:
    pieces: list[bytes] = []
    for byte in STREAM:
        pieces += [b"", bytes([byte])]
    assert list(data_payloads(pieces)) == EXPECTED


def test_a_carriage_return_and_its_line_feed_in_different_pieces() -> None:
    assert list(data_payloads([b"data: one\r", b"\ndata: two\r", b"\n"])) == [b"one", b"two"]


def test_only_data_lines_yield_payloads() -> None:
    stream = b"event: ping\nid: 1\n: comment\nretry: 5\n\n"
    assert list(data_payloads([stream])) == []


def test_payloads_are_yielded_as_their_lines_complete() -> None:
    """A relay forwards each event as it arrives, without waiting for the stream to end."""
    seen: list[str] = []

    def pieces() -> Iterator[bytes]:
        seen.append("first piece")
        yield b"data: 1\ndata: "
        seen.append("second piece")
        yield b"2\n"

    payloads = data_payloads(pieces())
    assert next(payloads) == b"1"
    assert seen == ["first piece"]
    assert next(payloads) == b"2"
    assert seen == ["first piece", "second piece"]


def test_a_very_long_line_in_small_pieces() -> None:
    long_payload = json.dumps({"content": "x" * (5 * 1024 * 1024)}).encode()
    stream = b"data: " + long_payload + b"\r\n\r\ndata: after\n\n"
    size = 8 * 1024
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert len(pieces) > 600
    assert list(data_payloads(pieces)) == [long_payload, b"after"]


# -- assembling chunks --------------------------------------------------------------------------


def chunk(choices: list[dict[str, Any]], **head: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", **head, "choices": choices}


def test_role_and_content_deltas_are_concatenated() -> None:
    assembler = CompletionAssembler()
    assembler.add(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]))
    assembler.add(chunk([{"index": 0, "delta": {"content": "Hel"}}]))
    assembler.add(chunk([{"index": 0, "delta": {"content": "lo"}}]))
    assembler.add(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    completion = assembler.completion()
    assert completion["object"] == "chat.completion"
    assert completion["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
    ]
    assert "usage" not in completion


def test_a_refusal_is_concatenated_and_content_stays_null() -> None:
    assembler = CompletionAssembler()
    assembler.add(chunk([{"index": 0, "delta": {"role": "assistant", "refusal": "I can"}}]))
    assembler.add(chunk([{"index": 0, "delta": {"refusal": "not help."}}]))
    assembler.add(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    message = assembler.completion()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": "I cannot help."}


def test_several_choices_by_index_in_index_order() -> None:
    assembler = CompletionAssembler()
    assembler.add(chunk([{"index": 1, "delta": {"role": "assistant", "content": "B"}}]))
    assembler.add(chunk([{"index": 0, "delta": {"role": "assistant", "content": "A"}}]))
    assembler.add(chunk([{"index": 1, "delta": {"content": "b"}}, {"index": 0, "delta": {"content": "a"}}]))
    assembler.add(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    assembler.add(chunk([{"index": 1, "delta": {}, "finish_reason": "length"}]))
    choices = assembler.completion()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == ["Aa", "Bb"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]


def test_tool_calls_are_assembled_by_index() -> None:
    assembler = CompletionAssembler()
    assembler.add(chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}]))
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_", "arguments": ""}}
    assembler.add(chunk([{"index": 0, "delta": {"tool_calls": [first]}}]))
    second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    assembler.add(chunk([{"index": 0, "delta": {"tool_calls": [second]}}]))
    # Pieces of both calls, interleaved, as parallel tool calls arrive.
    pieces = [
        {"index": 0, "function": {"name": "weather", "arguments": '{"ci'}},
        {"index": 1, "function": {"arguments": '{"q": '}},
    ]
    assembler.add(chunk([{"index": 0, "delta": {"tool_calls": pieces}}]))
    pieces = [
        {"index": 0, "function": {"arguments": 'ty": "Oslo"}'}},
        {"index": 1, "function": {"arguments": "1}"}},
    ]
    assembler.add(chunk([{"index": 0, "delta": {"tool_calls": pieces}}]))
    assembler.add(chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    choice = assembler.completion()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
    ]
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}


def test_usage_is_kept_and_head_fields_come_from_the_first_chunk() -> None:
    assembler = CompletionAssembler()
    assembler.add(
        chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}],
            id="chatcmpl-first",
            created=1700000000,
            model="gpt-first",
            system_fingerprint="fp_1",
        )
    )
    assembler.add(
        {
            "id": "chatcmpl-later",
            "created": 1700000099,
            "model": "gpt-later",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": None,
        }
    )
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    assembler.add({"id": "chatcmpl-last", "model": "gpt-last", "choices": [], "usage": usage})
    completion = assembler.completion()
    assert completion["id"] == "chatcmpl-first"
    assert completion["created"] == 1700000000
    assert completion["model"] == "gpt-first"
    assert completion["system_fingerprint"] == "fp_1"
    assert completion["usage"] == usage
    assert completion["choices"][0]["message"]["content"] == "Hi"
    assert completion["choices"][0]["finish_reason"] == "stop"


# -- replaying a stored completion --------------------------------------------------------------

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-42",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_abc",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Second answer."},
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
}


def replay(completion: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
    events = completion_as_events(copy.deepcopy(completion))
    payloads = list(data_payloads([events]))
    assembler = CompletionAssembler()
    for payload in payloads:
        if payload != b"[DONE]":
            assembler.add(json.loads(payload))
    return payloads, assembler.completion()


def test_a_replayed_completion_assembles_back_to_itself() -> None:
    payloads, assembled = replay(COMPLETION)
    assert assembled == COMPLETION
    assert payloads[-1] == b"[DONE]"
    assert payloads.count(b"[DONE]") == 1


def test_replayed_events_are_chunks_ending_with_done() -> None:
    events = completion_as_events(copy.deepcopy(COMPLETION))
    assert events.endswith(b"data: [DONE]\n\n")
    blocks = events.split(b"\n\n")
    assert blocks[-1] == b""
    for block in blocks[:-2]:
        assert block.startswith(b"data: ")
        event = json.loads(block[len(b"data: ") :])
        assert event["object"] == "chat.completion.chunk"
        assert event["id"] == "chatcmpl-42"
        assert event["model"] == "gpt-4o-mini"
        for choice in event["choices"]:
            for position, call in enumerate(choice["delta"].get("tool_calls") or []):
                assert call["index"] == position
    last_chunk = json.loads(blocks[-3][len(b"data: ") :])
    assert last_chunk["choices"] == [] and last_chunk["usage"] == COMPLETION["usage"]


def test_a_replayed_completion_without_usage_or_content() -> None:
    completion: dict[str, Any] = {
        "id": "chatcmpl-7",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length"}
        ],
    }
    payloads, assembled = replay(completion)
    assert assembled == completion
    assert payloads[-1] == b"[DONE]"
