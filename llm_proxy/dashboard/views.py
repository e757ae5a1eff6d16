"""What the dashboard's templates and JSON show, built from domain objects: plain dicts of strings
and numbers, so that templates only lay them out (and escape them)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from llm_proxy.domain.endpoints import Endpoint, endpoint_of
from llm_proxy.domain.listing import Listed, Summary
from llm_proxy.domain.status import StatusEntry

CHART_MINUTES = 60
CHART_WIDTH = 600
CHART_HEIGHT = 120


def when(ms: int | None) -> str:
    if not ms:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + " UTC"


def seconds(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.1f} min"


def percentile(values: Sequence[int], fraction: float) -> int | None:
    """The nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def row(listed: Listed, now_ms: int) -> dict[str, Any]:
    return {
        "id": listed.request_id,
        "status": listed.status.value,
        "endpoint": listed.endpoint,
        "model": listed.model or "",
        "submitted": when(listed.submitted_at),
        "duration": seconds(listed.duration_ms(now_ms)),
        "attempts": listed.attempts,
        "error_type": listed.error_type or "",
    }


def per_minute(summary: Summary, now_ms: int) -> list[tuple[int, int, int]]:
    """(minute start, completed, failed) for each of the last ``CHART_MINUTES`` minutes, oldest
    first, empty minutes included."""
    current = now_ms // 60_000 * 60_000
    minutes = [current - 60_000 * back for back in reversed(range(CHART_MINUTES))]
    return [(m, *summary.per_minute.get(m, (0, 0))) for m in minutes]


def chart_svg(points: Sequence[tuple[int, int, int]]) -> str:
    """A bar per minute (completed above, failed in another colour on top) as inline SVG, built from
    numbers only, so it needs no escaping. Its title and the figure's caption say what it shows
    for screen readers."""
    highest = max((done + failed for _, done, failed in points), default=0) or 1
    bar = CHART_WIDTH / max(1, len(points))
    bars = []
    for index, (_, done, failed) in enumerate(points):
        x = index * bar
        done_height = CHART_HEIGHT * done / highest
        failed_height = CHART_HEIGHT * failed / highest
        if done:
            y = CHART_HEIGHT - done_height
            bars.append(
                f'<rect class="done" x="{x:.1f}" y="{y:.1f}" width="{bar * 0.8:.1f}"'
                f' height="{done_height:.1f}"/>'
            )
        if failed:
            y = CHART_HEIGHT - done_height - failed_height
            bars.append(
                f'<rect class="failed" x="{x:.1f}" y="{y:.1f}" width="{bar * 0.8:.1f}"'
                f' height="{failed_height:.1f}"/>'
            )
    total = sum(done + failed for _, done, failed in points)
    return (
        f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" preserveAspectRatio="none"'
        f' role="img" aria-label="Requests finished per minute over the last hour: {total} in all,'
        f' at most {highest if total else 0} in one minute">'
        f'<line class="axis" x1="0" y1="{CHART_HEIGHT}" x2="{CHART_WIDTH}" y2="{CHART_HEIGHT}"/>'
        + "".join(bars)
        + "</svg>"
    )


def overview(
    *,
    summary: Summary,
    waiting: int,
    in_flight: int,
    max_concurrent: int,
    recent: Sequence[Listed],
    rate_limits: Sequence[Mapping[str, Any]],
    now_ms: int,
) -> dict[str, Any]:
    points = per_minute(summary, now_ms)
    return {
        "waiting": waiting,
        "in_flight": in_flight,
        "max_concurrent": max_concurrent,
        "completed": summary.completed,
        "failed": summary.failed,
        "per_minute_peak": max((d + f for _, d, f in points), default=0),
        "latency_p50": seconds(percentile(summary.latencies_ms, 0.5)) or "none yet",
        "latency_p95": seconds(percentile(summary.latencies_ms, 0.95)) or "none yet",
        "latency_samples": len(summary.latencies_ms),
        "webhooks_pending": summary.webhooks_pending,
        "webhooks_failed": summary.webhooks_failed,
        "chart": chart_svg(points),
        "recent": [row(listed, now_ms) for listed in recent],
        "rate_limits": [{str(k): str(v) for k, v in limits.items()} for limits in rate_limits],
    }


def rate_limit_rows(
    throttles: Mapping[str, float], remaining: Mapping[str, Mapping[str, int]], now: float
) -> list[dict[str, str]]:
    """One row per model the limits know of: held back until when (a 429's pause, a ceiling or
    the paced budget), and what the upstream last reported left."""
    rows = []
    for model in sorted(set(throttles) | set(remaining)):
        until = throttles.get(model)
        left = remaining.get(model, {})
        rows.append(
            {
                "model": "every model" if model == "*" else model,
                "held back until": when(int(until * 1000)) if until and until > now else "not held back",
                "remaining requests": str(left.get("remaining requests", "not reported")),
                "remaining tokens": str(left.get("remaining tokens", "not reported")),
            }
        )
    return rows


_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
"""The part types that carry ``text``: chat's, and the Responses API's input and output."""


def _text(content: Any) -> str:
    """A message's content: text, or the text parts of a list of parts (images named, not shown)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "refusal":
                parts.append(f"[refusal] {part.get('refusal', '')}")
            elif isinstance(part, dict):
                parts.append(f"[{part.get('type', 'part')}]")
        return "\n".join(parts)
    return "" if content is None else json.dumps(content)


def _loaded(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _prompt(value: Any) -> str:
    """An ``input`` (embeddings) or ``prompt`` (completions): text, texts, or token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return "\n---\n".join(value)
    return "" if value is None else json.dumps(value)


def _sent(endpoint: Endpoint, body: Mapping[str, Any]) -> list[dict[str, str]]:
    """What a request asked, as (role, content) messages."""
    if endpoint is Endpoint.CHAT:
        items = body.get("messages")
        return [
            {"role": str(m.get("role", "")), "content": _text(m.get("content"))}
            for m in (items if isinstance(items, list) else [])
            if isinstance(m, dict)
        ]
    if endpoint is Endpoint.COMPLETIONS:
        return [{"role": "prompt", "content": _prompt(body["prompt"])}] if "prompt" in body else []
    if endpoint is Endpoint.EMBEDDINGS:
        return [{"role": "input", "content": _prompt(body["input"])}] if "input" in body else []
    # The Responses API: instructions, then a text or a list of items (messages, tool outputs, ...).
    sent = []
    if body.get("instructions"):
        sent.append({"role": "instructions", "content": _text(body["instructions"])})
    given = body.get("input")
    if isinstance(given, str):
        sent.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if isinstance(item, dict) and "content" in item:
                sent.append({"role": str(item.get("role", "user")), "content": _text(item["content"])})
            elif item is not None:
                kind = item.get("type", "input") if isinstance(item, dict) else "input"
                sent.append({"role": str(kind), "content": json.dumps(item, indent=2)})
    return sent


def _vectors(data: Any) -> str:
    """Embeddings described, not shown: how many vectors, of how many dimensions."""
    vectors = (
        [item.get("embedding") for item in data if isinstance(item, dict)] if isinstance(data, list) else []
    )
    lists = [vector for vector in vectors if isinstance(vector, list)]
    dimensions = sorted({len(vector) for vector in lists})
    described = f"{len(vectors)} vector{'' if len(vectors) == 1 else 's'}"
    if dimensions:
        described += f" of {', '.join(str(d) for d in dimensions)} dimensions"
    if len(lists) < len(vectors):
        described += " (base64-encoded)" if not lists else f" ({len(vectors) - len(lists)} base64-encoded)"
    return described


def _answered(endpoint: Endpoint, response: Any) -> list[dict[str, str]]:
    """What the upstream answered, as (role, content) messages."""
    if not isinstance(response, dict):
        return []
    if endpoint is Endpoint.EMBEDDINGS:
        return (
            [{"role": "embeddings", "content": _vectors(response.get("data"))}] if "data" in response else []
        )
    if endpoint is Endpoint.RESPONSES:
        answers = []
        output = response.get("output")
        for item in output if isinstance(output, list) else []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                answers.append(
                    {"role": str(item.get("role", "assistant")), "content": _text(item.get("content"))}
                )
            elif item.get("type") != "reasoning":
                # Tool calls and the like: as sent, they are the answer.
                answers.append(
                    {"role": str(item.get("type", "output")), "content": json.dumps(item, indent=2)}
                )
        return answers
    answers = []
    choices = response.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if endpoint is Endpoint.COMPLETIONS:
            answers.append({"role": "completion", "content": _prompt(choice.get("text"))})
            continue
        message = choice.get("message", {})
        if isinstance(message, dict):
            text = _text(message.get("content"))
            if message.get("tool_calls"):
                text = (text + "\n" if text else "") + json.dumps(message["tool_calls"], indent=2)
            answers.append({"role": str(message.get("role", "assistant")), "content": text})
    return answers


def detail(request_id: str, entry: StatusEntry, position: int | None, now_ms: int) -> dict[str, Any]:
    endpoint = endpoint_of(request_id)
    body = _loaded(entry.request_json)
    body = body if isinstance(body, dict) else {}
    messages = _sent(endpoint, body)
    response = _loaded(entry.response_json)
    answers = _answered(endpoint, response)
    error = entry.error or {}
    webhook = entry.webhook
    submitted = entry.submitted_at if entry.submitted_at is not None else None
    return {
        "id": request_id,
        "status": entry.status.value,
        "endpoint": endpoint.path,
        "model": str(body.get("model", "")),
        "submitted": when(submitted),
        "changed": when(entry.timestamp),
        "position": position,
        "attempts": entry.attempts_made,
        "messages": messages,
        "input": "" if messages else json.dumps(body, indent=2)[:20_000],
        "answers": answers,
        "usage": json.dumps(response.get("usage"))
        if isinstance(response, dict) and response.get("usage")
        else "",
        "error": {str(k): json.dumps(v) if isinstance(v, dict | list) else str(v) for k, v in error.items()},
        "history": [
            {
                "number": number,
                "started": when(attempt.started_at),
                "duration": seconds(attempt.duration_ms) if attempt.duration_ms is not None else "under way",
                "outcome": attempt.outcome,
            }
            for number, attempt in enumerate(entry.history, 1)
        ],
        "webhook": None
        if webhook is None
        else {
            "url": str(body.get("webhookUrl", "")),
            "state": webhook.state.value,
            "attempts": webhook.attempts,
            "last_status": "" if webhook.last_status is None else str(webhook.last_status),
            "last_error": webhook.last_error or "",
            "next_attempt": when(webhook.next_attempt_at),
        },
        "cancellable": not entry.status.final,
    }
