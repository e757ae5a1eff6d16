"""The body parser and validator, on chosen cases and on arbitrary input (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_proxy.api.validation import (
    BodyError,
    parse_chat_completion,
    parse_json_object,
    validate_chat_completion,
)

VALID: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def details(payload: Any) -> list[dict[str, str]]:
    with pytest.raises(BodyError) as caught:
        validate_chat_completion(payload)
    return caught.value.details


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"temperature": 0, "top_p": 1, "n": 2, "stop": ["a", "b", "c", "d"], "max_tokens": 1},
        {"temperature": None, "max_tokens": None, "stop": None, "tools": None},
        {"presence_penalty": -2, "frequency_penalty": 2.0, "max_completion_tokens": 100},
        {
            "seed": 1,
            "user": "u",
            "logprobs": True,
            "metadata": {"a": "b"},
            "parallel_tool_calls": False,
            "reasoning_effort": "low",
            "some_future_field": [1, 2],
        },
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
        {"functions": [{"name": "f"}], "function_call": {"name": "f"}},
        {"response_format": {"type": "json_object"}, "stream": True},
        {"webhookUrl": "https://hooks.example.com/x?y=1"},
    ],
)
def test_requests_openai_accepts_pass_unchanged(extra: dict[str, Any]) -> None:
    payload = {**VALID, **extra}
    assert validate_chat_completion(json.loads(json.dumps(payload))) == payload


@pytest.mark.parametrize(
    "message",
    [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "content": "r", "tool_call_id": "1"},
        {"role": "function", "content": "r", "name": "f"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
            ],
        },
    ],
)
def test_every_message_form_is_accepted(message: dict[str, Any]) -> None:
    validate_chat_completion({"model": "m", "messages": [message]})


@pytest.mark.parametrize(
    "field,value,path",
    [
        ("model", "", "model"),
        ("model", 3, "model"),
        ("messages", [], "messages"),
        ("messages", "hi", "messages"),
        ("messages", [{"content": "x"}], "messages.0.role"),
        ("messages", [{"role": "user", "content": 1}], "messages.0.content"),
        ("messages", [{"role": "user", "content": [1]}], "messages.0.content"),
        ("messages", [{"role": "user", "content": "a", "tool_calls": "x"}], "messages.0.tool_calls"),
        ("temperature", 2.01, "temperature"),
        ("temperature", -0.1, "temperature"),
        ("temperature", "1", "temperature"),
        ("temperature", True, "temperature"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 1.5, "max_tokens"),
        ("max_completion_tokens", 0, "max_completion_tokens"),
        ("stream", "yes", "stream"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -3, "frequency_penalty"),
        ("top_p", 1.1, "top_p"),
        ("n", 0, "n"),
        ("stop", ["a", "b", "c", "d", "e"], "stop"),
        ("stop", [1], "stop"),
        ("functions", "f", "functions"),
        ("function_call", 3, "function_call"),
        ("tools", [1], "tools"),
        ("tool_choice", 1, "tool_choice"),
        ("response_format", "json", "response_format"),
        ("webhookUrl", "not a url", "webhookUrl"),
        ("webhookUrl", "ftp://example.com/", "webhookUrl"),
        ("webhookUrl", "https:///nohost", "webhookUrl"),
        ("webhookUrl", "https://user:pw@example.com/", "webhookUrl"),
        ("webhookUrl", "https://example.com/\u0000", "webhookUrl"),
        ("webhookUrl", "https://example.com/a\nb", "webhookUrl"),
        ("webhookUrl", "http://example.com:99999/", "webhookUrl"),
    ],
)
def test_each_bad_field_is_reported_at_its_path(field: str, value: Any, path: str) -> None:
    assert path in [d["path"] for d in details({**VALID, field: value})]


def test_missing_required_fields_are_all_reported() -> None:
    assert sorted(d["path"] for d in details({})) == ["messages", "model"]


def test_problems_in_several_messages_are_all_reported() -> None:
    found = details({"model": "m", "messages": [{"role": "x"}, "y", {"role": "user", "content": 2}]})
    assert sorted(d["path"] for d in found) == ["messages.0.role", "messages.1", "messages.2.content"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"[]",
        b"1",
        b'"s"',
        b"null",
        b"NaN",
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b"[" * 100_000,
        b'{"a":' * 5000,
        b"\xc3\x28",
        b'{"a": 1' + b"0" * 5000 + b"}",
    ],
)
def test_non_objects_and_bad_json_are_refused(raw: bytes) -> None:
    with pytest.raises(BodyError) as caught:
        parse_json_object(raw)
    assert caught.value.details[0]["path"] == ""


def test_duplicate_keys_take_the_last_value_like_json_parsers_do() -> None:
    assert parse_json_object(b'{"a": 1, "a": 2}') == {"a": 2}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    try:
        parse_chat_completion(raw)
    except BodyError as exc:
        assert exc.details and all(isinstance(d["message"], str) for d in exc.details)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "messages",
                "temperature",
                "max_tokens",
                "stop",
                "n",
                "top_p",
                "stream",
                "tools",
                "webhookUrl",
                "tool_choice",
                "x",
            ]
        ),
        json_values,
        max_size=8,
    )
)
def test_arbitrary_json_objects_are_accepted_or_refused_with_details(payload: dict[str, Any]) -> None:
    raw = json.dumps(payload).encode()
    try:
        assert parse_chat_completion(raw) == payload
    except BodyError as exc:
        assert exc.details
        for detail in exc.details:
            assert detail["path"].split(".")[0] in payload or detail["path"] in ("model", "messages")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_unicode_content_is_accepted(content: str) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": content}]}
    assert parse_chat_completion(json.dumps(payload).encode()) == payload
