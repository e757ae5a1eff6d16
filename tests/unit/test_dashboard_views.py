"""What the dashboard shows of each endpoint's requests and answers, and whose address a sign-in
is throttled on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_proxy.dashboard.sessions import client_address
from llm_proxy.dashboard.views import detail
from llm_proxy.domain.status import Status, StatusEntry


def shown(request_id: str, body: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    entry = StatusEntry(
        status=Status.COMPLETED,
        request_json=json.dumps(body),
        owner="o",
        timestamp=1,
        response_json=json.dumps(response),
    )
    return detail(request_id, entry, None, 2)


def test_embeddings_are_counted_not_shown() -> None:
    data = shown(
        "embreq_0123456789abcdef",
        {"model": "e", "input": ["one", "two"]},
        {"data": [{"embedding": [0.5] * 3}, {"embedding": [0.5] * 3}, {"embedding": "AAAA"}]},
    )
    assert data["endpoint"] == "/v1/embeddings"
    assert data["messages"] == [{"role": "input", "content": "one\n---\ntwo"}]
    assert data["answers"] == [
        {"role": "embeddings", "content": "3 vectors of 3 dimensions (1 base64-encoded)"}
    ]


def test_completions_show_the_prompt_and_each_choices_text() -> None:
    data = shown(
        "cmplreq_0123456789abcdef",
        {"model": "c", "prompt": [1, 2, 3]},
        {"choices": [{"text": "first"}, {"text": "second"}]},
    )
    assert data["messages"] == [{"role": "prompt", "content": "[1, 2, 3]"}]
    assert [a["content"] for a in data["answers"]] == ["first", "second"]


def test_responses_show_the_input_items_and_the_output_text() -> None:
    body = {
        "model": "r",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    }
    response = {
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "function_call", "name": "lookup", "arguments": "{}"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hi there"}],
            },
        ]
    }
    data = shown("respreq_0123456789abcdef", body, response)
    assert [m["role"] for m in data["messages"]] == ["instructions", "user", "function_call_output"]
    assert data["messages"][1]["content"] == "hello"
    assert [a["role"] for a in data["answers"]] == ["function_call", "assistant"]
    assert data["answers"][1]["content"] == "hi there" and '"lookup"' in data["answers"][0]["content"]


def test_chat_is_shown_as_before() -> None:
    data = shown(
        "chatreq_0123456789abcdef",
        {"model": "m", "messages": [{"role": "user", "content": "q"}]},
        {"choices": [{"message": {"role": "assistant", "content": "a"}}]},
    )
    assert data["messages"] == [{"role": "user", "content": "q"}]
    assert data["answers"] == [{"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    ("peer", "forwarded", "keyed_on"),
    [
        ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # direct: the header is the client's own
        ("8.8.8.8", "1.2.3.4, 10.0.0.1", "8.8.8.8"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.1", "198.51.100.1"),  # Heroku's router appends the client
        ("172.20.1.1", "198.51.100.1", "198.51.100.1"),
        ("192.168.1.1", "198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("::ffff:10.0.0.3", "198.51.100.1", "198.51.100.1"),
        ("203.0.113.7", "", "203.0.113.7"),
        ("10.0.0.2", "", "10.0.0.2"),
        ("not an address", "198.51.100.1", "not an address"),
        ("", "198.51.100.1", "unknown"),
    ],
)
def test_the_throttle_believes_x_forwarded_for_only_from_a_proxy_of_ours(
    peer: str, forwarded: str, keyed_on: str
) -> None:
    environ = {"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": forwarded}
    assert client_address(environ) == keyed_on
