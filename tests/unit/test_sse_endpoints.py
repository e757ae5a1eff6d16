"""Streams of the completions and Responses endpoints: events split at any boundary, folded into
the object the unstreamed call answers, and a stored one replayed as events."""

from __future__ import annotations

import json
from typing import Any

import openai
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.upstream.sse import (
    Event,
    ResponseAssembler,
    TextCompletionAssembler,
    as_events,
    assembler_for,
    sse_events,
)

RESPONSE = {"id": "resp_1", "object": "response", "status": "completed", "output": [{"type": "message"}]}
TYPED = (
    b": comment\n\n"
    b"event: response.created\n"
    b'data: {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}\n\n'
    b"id: 3\r\nevent: response.output_text.delta\r\n"
    b'data: {"type": "response.output_text.delta", "delta": "Hi"}\r\n\r\n'
    b"event: response.completed\n"
    b"data: " + json.dumps({"type": "response.completed", "response": RESPONSE}).encode() + b"\n\n"
)


def test_typed_events_split_anywhere_keep_their_names() -> None:
    whole = list(sse_events([TYPED]))
    assert [e.name for e in whole] == [
        b"response.created",
        b"response.output_text.delta",
        b"response.completed",
    ]
    for cut in range(len(TYPED) + 1):
        assert list(sse_events([TYPED[:cut], TYPED[cut:]])) == whole
    # Relayed as sent, less the connection's own fields (id, comments).
    assert whole[1].raw == (
        b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "Hi"}\n\n'
    )


def test_multi_line_data_and_an_unterminated_last_event() -> None:
    events = list(sse_events([b"data: a\ndata: b\n\ndata: [DONE]"]))
    assert events == [Event(None, b"a\nb"), Event(None, b"[DONE]")]
    assert events[0].raw == b"data: a\ndata: b\n\n"


def test_the_response_is_the_one_of_response_completed() -> None:
    assembler = ResponseAssembler()
    for event in sse_events([TYPED]):
        chunk = json.loads(event.data)
        assert assembler.failure(chunk) is None
        assembler.add(chunk)
    assert assembler.done and assembler.completion() == RESPONSE


def test_failed_responses_and_error_events_are_failures() -> None:
    assembler = assembler_for(Endpoint.RESPONSES)
    failed = {"type": "response.failed", "response": {"error": {"code": "server_error", "message": "boom"}}}
    assert assembler.failure(failed) == {"message": "boom", "code": "server_error"}
    error = assembler.failure({"type": "error", "code": "x", "message": "bad", "param": None})
    assert error is not None and error["message"] == "bad" and error["code"] == "x"


def test_text_completion_chunks_fold_into_a_text_completion() -> None:
    assembler = TextCompletionAssembler()
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m"}
    chunks: list[dict[str, Any]] = [
        {**head, "choices": [{"index": 0, "text": "Hello", "logprobs": {"tokens": ["Hello"]}}]},
        {**head, "choices": [{"index": 0, "text": " world", "logprobs": {"tokens": [" world"]}}]},
        {**head, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": {"total_tokens": 3}},
    ]
    for chunk in chunks:
        assembler.add(chunk)
    completion = assembler.completion()
    assert completion == {
        **head,
        "choices": [
            {
                "index": 0,
                "text": "Hello world",
                "logprobs": {"tokens": ["Hello", " world"]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"total_tokens": 3},
    }
    # Replayed and folded again: the same object.
    again = TextCompletionAssembler()
    for event in sse_events([as_events(Endpoint.COMPLETIONS, completion)]):
        if event.data != b"[DONE]":
            again.add(json.loads(event.data))
    assert again.completion() == completion


RICH = {
    "id": "resp_2",
    "object": "response",
    "created_at": 1,
    "model": "gpt-test",
    "status": "completed",
    "completed_at": 2,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": {
        "input_tokens": 1,
        "output_tokens": 8,
        "total_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 2},
    },
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": 'Hi "there"',
                    "annotations": [
                        {
                            "type": "url_citation",
                            "url": "https://x.test/",
                            "title": "x",
                            "start_index": 0,
                            "end_index": 2,
                        }
                    ],
                },
                {"type": "refusal", "refusal": "not that"},
            ],
        },
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
    ],
}


def test_a_stored_response_replays_as_the_events_a_streamed_one_sends() -> None:
    raw = as_events(Endpoint.RESPONSES, RICH)
    assert b"[DONE]" not in raw
    events = [(e.name, json.loads(e.data)) for e in sse_events([raw])]
    assert all(name is not None and name.decode() == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    kinds = [data["type"] for _, data in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert events[0][1]["response"]["output"] == [] and events[0][1]["response"]["status"] == "in_progress"
    assert kinds[-1] == "response.completed" and events[-1][1]["response"] == RICH
    # What clients read while streaming: the text, the refusal and the arguments, whole.
    of = {kind: [data for _, data in events if data["type"] == kind] for kind in kinds}
    assert [d["delta"] for d in of["response.output_text.delta"]] == ['Hi "there"']
    assert of["response.output_text.delta"][0] | {"delta": None} == {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "delta": None,
        "logprobs": [],
        "sequence_number": of["response.output_text.delta"][0]["sequence_number"],
    }
    assert [d["delta"] for d in of["response.refusal.delta"]] == ["not that"]
    assert of["response.refusal.delta"][0]["content_index"] == 1
    assert [(d["name"], d["arguments"]) for d in of["response.function_call_arguments.done"]] == [
        ("f", '{"a": 1}')
    ]
    assert [d["delta"] for d in of["response.reasoning_summary_text.delta"]] == ["thinking"]
    assert of["response.output_item.added"][0]["item"]["summary"] == []
    annotations = [d["annotation"] for d in of["response.output_text.annotation.added"]]
    assert annotations == [RICH["output"][1]["content"][0]["annotations"][0]]  # type: ignore[index]
    # Every item opened before its parts and closed as stored, in order.
    assert [(d["output_index"], d["item"]["id"]) for d in of["response.output_item.added"]] == [
        (0, "rs_1"),
        (1, "msg_1"),
        (2, "fc_1"),
    ]
    assert [d["item"] for d in of["response.output_item.done"]] == RICH["output"]
    assert of["response.output_item.added"][1]["item"]["content"] == []
    assert [d["part"]["type"] for d in of["response.content_part.done"]] == ["output_text", "refusal"]
    # Folded again as a streamed answer is: the same response.
    assembler = ResponseAssembler()
    for _, data in events:
        assembler.add(data)
    assert assembler.done and assembler.completion() == RICH


def test_a_stored_response_cut_short_replays_as_incomplete() -> None:
    cut = {**RESPONSE, "status": "incomplete", "output": [{"type": "message", "id": "m", "content": []}]}
    events = list(sse_events([as_events(Endpoint.RESPONSES, cut)]))
    assert events[-1].name == b"response.incomplete"
    assert [e.name for e in events].count(b"response.output_item.done") == 1


def _sdk_folds(response: dict[str, Any]) -> tuple[str, Any]:
    """What the OpenAI SDK's ``responses.stream`` makes of the replayed events: the text its
    delta events carry, and the response it hands over at the end. Each event is first checked
    against the SDK's own event types, strictly; the SDK raises on events it cannot fold."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    told = [
        told
        for event in sse_events([as_events(Endpoint.RESPONSES, response)])
        for told in state.handle_event(adapter.validate_python(json.loads(event.data)))
    ]
    text = "".join(e.delta for e in told if e.type == "response.output_text.delta")
    assert told[-1].type == "response.completed"
    return text, told[-1].response


def test_the_sdk_folds_a_replayed_response_into_the_stored_one() -> None:
    text, final = _sdk_folds(RICH)
    assert text == 'Hi "there"' and final.output_text == 'Hi "there"'
    assert final.id == "resp_2" and [item.id for item in final.output] == ["rs_1", "msg_1", "fc_1"]
    assert final.output[2].arguments == '{"a": 1}' and final.usage.total_tokens == 9


def test_outputs_the_sdk_could_not_tell_apart_replay_as_their_first_and_last_events() -> None:
    """Items without ids, or two with one identity (some compatible upstreams send them): the
    SDK would raise on their item events (or the events would name no item), so only the
    response itself is told."""
    message: dict[str, Any] = RICH["output"][1]  # type: ignore[index]
    nameless = {k: v for k, v in message.items() if k != "id"}
    for output in ([nameless], [nameless, nameless], [message, message]):
        response = {**RICH, "output": output}
        kinds = [e.name for e in sse_events([as_events(Endpoint.RESPONSES, response)])]
        assert kinds == [b"response.created", b"response.in_progress", b"response.completed"]
