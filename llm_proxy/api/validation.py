"""Parsing and validating a request body, per endpoint (chat completions, embeddings, the
Responses API, legacy completions).

Only what the seed lists is checked, with OpenAI's ranges; every other field passes through
untouched, so a request OpenAI accepts is never refused here. ``null`` is accepted wherever
OpenAI accepts it for an optional field.
"""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any
from urllib.parse import urlsplit

from voluptuous import (
    ALLOW_EXTRA,
    All,
    Invalid,
    Length,
    MultipleInvalid,
    Range,
    Required,
    Schema,
)

from llm_proxy.domain.endpoints import Endpoint

ROLES = ("system", "user", "assistant", "function", "tool", "developer")
MAX_COUNT = 2**31 - 1
"""The largest ``max_tokens`` / ``n`` accepted: beyond any model, and small enough for every count
kept of it (a float, a Postgres integer)."""


class BodyError(Exception):
    """The body is not a valid chat-completion request. ``details`` lists each problem found."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("Invalid request body")
        self.details = details


def _number(value: Any) -> float | int:
    # bool is an int in Python but not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid("expected a number")
    return value


def _integer(value: Any) -> int | float:
    # JSON has one number type: 2.0 is an integer too (as JSON Schema counts it).
    if isinstance(value, float) and value.is_integer():
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("expected an integer")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("expected a string")
    return value


def _non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a non-empty string")
    return value


def _model(value: Any) -> str:
    # The model is stored in a text column (Postgres refuses NUL) and keys shared rate-limit state.
    name = _non_empty_string(value)
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise Invalid("must not contain control characters")
    return name


def _count(minimum: int) -> Any:
    """An optional integer from ``minimum`` to MAX_COUNT."""
    return _optional(_integer, Range(min=minimum, max=MAX_COUNT))


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected a boolean")
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid("expected an object")
    return value


def _list_of_objects(value: Any) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Invalid("expected a list of objects")
    return value


def _content(value: Any) -> Any:
    if value is None or isinstance(value, str) or _is_parts(value):
        return value
    raise Invalid("expected a string, a list of content parts, or null")


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(part, dict) and isinstance(part.get("type"), str) for part in value
    )


def _role(value: Any) -> str:
    if value not in ROLES:
        raise Invalid(f"expected one of {', '.join(ROLES)}")
    return str(value)


def _stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, str) for v in value):
        return value
    raise Invalid("expected a string or a list of up to 4 strings")


def _string_or_object(value: Any) -> Any:
    if isinstance(value, (str, dict)):
        return value
    raise Invalid("expected a string or an object")


def webhook_url(value: Any) -> str:
    """An absolute http(s) URL with a host and no credentials."""
    if not isinstance(value, str) or len(value) > 2048:
        raise Invalid("expected an absolute http(s) URL")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise Invalid("must not contain control characters")
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise Invalid("expected an absolute http(s) URL") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise Invalid("expected an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not contain credentials")
    return value


def _optional(*validators: Any) -> Any:
    chained = All(*validators)

    def validate(value: Any) -> Any:
        return None if value is None else chained(value)

    return validate


_MESSAGE = Schema(
    {
        Required("role"): _role,
        "content": _content,
        "name": _optional(_string),
        "function_call": _optional(_object),
        "tool_calls": _optional(_list_of_objects),
        "tool_call_id": _optional(_string),
    },
    extra=ALLOW_EXTRA,
)


def _message(value: Any) -> Any:
    if not isinstance(value, dict):
        raise Invalid("expected an object")
    return _MESSAGE(value)


def _messages(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise Invalid("expected a non-empty list of messages")
    # Validate each message on its own so every problem in every message is reported.
    errors: list[Invalid] = []
    for index, message in enumerate(value):
        try:
            _message(message)
        except MultipleInvalid as exc:
            errors.extend(
                Invalid(e.msg, path=[index, *e.path], error_message=e.error_message) for e in exc.errors
            )
        except Invalid as exc:
            errors.append(Invalid(exc.msg, path=[index, *exc.path], error_message=exc.error_message))
    if errors:
        raise MultipleInvalid(errors)
    return value


CHAT_COMPLETION = Schema(
    {
        Required("model"): _model,
        Required("messages"): _messages,
        "temperature": _optional(_number, Range(min=0, max=2)),
        "max_tokens": _count(1),
        "max_completion_tokens": _count(1),
        "stream": _optional(_boolean),
        "presence_penalty": _optional(_number, Range(min=-2, max=2)),
        "frequency_penalty": _optional(_number, Range(min=-2, max=2)),
        "top_p": _optional(_number, Range(min=0, max=1)),
        "n": _count(1),
        "stop": _stop,
        "functions": _optional(_list_of_objects, Length(min=1)),
        "function_call": _optional(_string_or_object),
        "tools": _optional(_list_of_objects),
        "tool_choice": _optional(_string_or_object),
        "response_format": _optional(_object),
        "webhookUrl": _optional(webhook_url),
    },
    extra=ALLOW_EXTRA,
)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body into a JSON object, refusing what Python's json would let through."""
    if not raw.strip():
        raise BodyError([{"path": "", "message": "the body is empty; expected a JSON object"}])
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise BodyError([{"path": "", "message": "the body is not valid UTF-8"}]) from None
    except RecursionError:
        raise BodyError([{"path": "", "message": "the body is nested too deeply"}]) from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, huge numbers, int digit limit
        raise BodyError([{"path": "", "message": f"the body is not valid JSON: {exc}"}]) from None
    if not isinstance(value, dict):
        raise BodyError([{"path": "", "message": "expected a JSON object"}])
    return value


def validate_chat_completion(body: dict[str, Any]) -> dict[str, Any]:
    """Check the body; raise BodyError with one detail per problem. Returns the body unchanged."""
    return validate(Endpoint.CHAT, body)


def parse_chat_completion(raw: bytes) -> dict[str, Any]:
    return validate_chat_completion(parse_json_object(raw))


def _token_array(value: Any) -> bool:
    # 2.0 is an integer in JSON too (as in ``_integer``).
    return isinstance(value, list) and all(
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
        for v in value
    )


def _texts_or_tokens(value: Any) -> Any:
    """A string, a list of strings, a token array, or a list of token arrays; never empty, as
    OpenAI requires for embeddings and completions alike."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or _token_array(value):
            return value
        if all(_token_array(v) and v for v in value):
            return value
    raise Invalid("expected a string, a list of strings, a token array or a list of token arrays")


def _response_input(value: Any) -> Any:
    """The Responses API's ``input``: a string, or a list of input items (messages, function call
    outputs, ...: objects), strings or token arrays."""
    if isinstance(value, str) and value:
        return value
    items = isinstance(value, list) and value
    if items and all(isinstance(v, (str, dict)) or _token_array(v) for v in value):
        return value
    raise Invalid("expected a non-empty string or a non-empty list of strings, token arrays or input items")


def _not_background(value: Any) -> Any:
    # An upstream background response answers at once with status "queued" and is then polled
    # upstream: the proxy would store an unfinished response as the result and free the slot
    # while the upstream still works. Queueing is what the proxy does for every request anyway.
    if value is True:
        raise Invalid(
            "background mode is not passed upstream: the proxy queues every request already "
            "(leave background out, and collect the result with GET /v1/responses/<request_id>, "
            "?wait=N, or a webhookUrl)"
        )
    if value is not None and not isinstance(value, bool):
        raise Invalid("expected a boolean")
    return value


EMBEDDING = Schema(
    {
        Required("model"): _model,
        Required("input"): _texts_or_tokens,
        "dimensions": _optional(_integer, Range(min=1)),
        "encoding_format": _optional(_string),
        "webhookUrl": _optional(webhook_url),
    },
    extra=ALLOW_EXTRA,
)

RESPONSE = Schema(
    {
        Required("model"): _model,
        Required("input"): _response_input,
        "stream": _optional(_boolean),
        "background": _not_background,
        "store": _optional(_boolean),
        "temperature": _optional(_number, Range(min=0, max=2)),
        "top_p": _optional(_number, Range(min=0, max=1)),
        "max_output_tokens": _count(1),
        "instructions": _optional(_string),
        "tools": _optional(_list_of_objects),
        "webhookUrl": _optional(webhook_url),
    },
    extra=ALLOW_EXTRA,
)

TEXT_COMPLETION = Schema(
    {
        Required("model"): _model,
        Required("prompt"): _texts_or_tokens,
        "stream": _optional(_boolean),
        "temperature": _optional(_number, Range(min=0, max=2)),
        "top_p": _optional(_number, Range(min=0, max=1)),
        "max_tokens": _count(0),
        "n": _count(1),
        "stop": _stop,
        "presence_penalty": _optional(_number, Range(min=-2, max=2)),
        "frequency_penalty": _optional(_number, Range(min=-2, max=2)),
        "webhookUrl": _optional(webhook_url),
    },
    extra=ALLOW_EXTRA,
)

SCHEMAS = {
    Endpoint.CHAT: CHAT_COMPLETION,
    Endpoint.EMBEDDINGS: EMBEDDING,
    Endpoint.RESPONSES: RESPONSE,
    Endpoint.COMPLETIONS: TEXT_COMPLETION,
}


def validate(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    """Check the body against its endpoint's schema; raise BodyError with one detail per problem.
    Returns the body unchanged."""
    try:
        SCHEMAS[endpoint](body)
    except MultipleInvalid as exc:
        details = [
            {"path": ".".join(str(p) for p in error.path), "message": error.error_message or error.msg}
            for error in exc.errors
        ]
        raise BodyError(details) from None
    except RecursionError:
        raise BodyError([{"path": "", "message": "the body is nested too deeply"}]) from None
    return body


def parse_body(endpoint: Endpoint, raw: bytes) -> dict[str, Any]:
    return validate(endpoint, parse_json_object(raw))
