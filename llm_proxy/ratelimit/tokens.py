"""A call's token cost, estimated before it is made, without a tokenizer. Pure.

OpenAI counts a request against its tokens-per-minute budget as its prompt plus the completion it
may produce (``max_tokens`` / ``max_completion_tokens``, times ``n``). tiktoken would download its
encodings on first use, so the prompt is estimated instead: a quarter of its characters, rounded
up, per text part, plus 4 tokens per message and 3 for the reply's priming (OpenAI's own counting
recipe), and 85 per image part (a low-detail image). For English prose this is within about 25 %
of tiktoken's count; code and JSON run about 30 % over it, and scripts without spaces (Chinese,
Japanese) can be 2 to 4 times under it. Tools and response formats count by the characters of
their JSON. The error does not accumulate: every answer's ``usage`` replaces the estimate.
"""

from __future__ import annotations

import json
import math
from typing import Any

PER_MESSAGE = 4
PRIMING = 3
PER_IMAGE = 85
MAX_TOKENS = 2**31 - 1
"""The most any estimate or usage counts for: a body's ``max_tokens`` can be any integer, and a
count must stay a float (and a sane one) in the rate-limit state."""


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return _text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                total += PER_IMAGE
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += _text_tokens(part["text"])
            elif part is not None:
                total += _text_tokens(json.dumps(part))
        return total
    if content is None:
        return 0
    return _text_tokens(json.dumps(content))


def completion_allowance(body: dict[str, Any]) -> int:
    """The most completion tokens the call may produce, when the request says (else 0)."""
    # max_output_tokens: the Responses API's name for it.
    limit = body.get("max_completion_tokens", body.get("max_tokens", body.get("max_output_tokens")))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        return 0
    choices = body.get("n", 1)
    return limit * (
        choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 else 1
    )


def estimate_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens (estimated) plus the completion allowance; at least 1, at most MAX_TOKENS.
    Never raises: a body it cannot read counts for 1 (its answer's usage corrects it)."""
    if not isinstance(body, dict):
        return 1
    try:
        return max(1, min(MAX_TOKENS, _estimate(body)))
    except (TypeError, ValueError, OverflowError, RecursionError, AttributeError):
        return 1


def _estimate(body: dict[str, Any]) -> int:
    total = PRIMING
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += PER_MESSAGE
            if isinstance(message, dict):
                total += _content_tokens(message.get("content"))
                for field in ("name", "tool_calls", "function_call"):
                    if field in message:
                        total += _content_tokens(message[field])
    for field in ("tools", "functions", "response_format"):
        if field in body:
            total += _content_tokens(json.dumps(body[field]))
    # Embeddings and the Responses API send ``input``, completions ``prompt``: that text is the
    # prompt (an embedding costs its input alone).
    for field in ("input", "prompt", "instructions"):
        if field in body:
            total += _input_tokens(body[field])
    return total + completion_allowance(body)


def _input_tokens(value: Any) -> int:
    """A string, a token array (a token each), or a list of strings, token arrays or input items."""
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return len(value)
        total = 0
        for item in value:
            if isinstance(item, dict):
                total += PER_MESSAGE + _content_tokens(item.get("content", item))
            else:
                total += _input_tokens(item)
        return total
    return _content_tokens(value)


def used_tokens(response_json: str | None) -> int | None:
    """``usage.total_tokens`` of a chat.completion, when it reports one."""
    if not response_json:
        return None
    try:
        usage = json.loads(response_json).get("usage")
    except (ValueError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return min(total, MAX_TOKENS)
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        return max(0, min(MAX_TOKENS, int(sum(p for p in parts if isinstance(p, int)))))
    return None
