"""The public JSON of a status entry and of a webhook payload, composed from stored JSON text."""

from __future__ import annotations

import json

from llm_proxy.domain.endpoints import endpoint_of
from llm_proxy.domain.job import now_ms
from llm_proxy.domain.status import Status, StatusEntry


def status_json(request_id: str, entry: StatusEntry, queue_position: int | None = None) -> str:
    parts = [
        f'"request_id": {json.dumps(request_id)}',
        f'"status": "{entry.status.value}"',
        f'"request": {entry.request_json}',
        f'"timestamp": {int(entry.timestamp)}',
    ]
    # A failed request's count was stored in its error only (entries stored so far still are).
    attempts = entry.attempts_made if entry.status.final else entry.attempts
    if attempts is not None:
        parts.append(f'"attempts": {int(attempts)}')
    if entry.response_json is not None:
        parts.append(f'"response": {entry.response_json}')
    if entry.error is not None:
        parts.append(f'"error": {json.dumps(entry.error)}')
    if entry.webhook is not None:
        parts.append(f'"webhook": {json.dumps(entry.webhook.to_dict())}')
    if queue_position is not None:
        parts.append(f'"queue_position": {int(queue_position)}')
    if entry.status is Status.PENDING and entry.throttled_until and entry.throttled_until > now_ms():
        parts.append(f'"throttled_until": {int(entry.throttled_until)}')
    return "{" + ", ".join(parts) + "}"


def webhook_json(request_id: str, entry: StatusEntry) -> str:
    """The seed's webhook payloads, plus the endpoint the request was sent to, so that one
    receiver can tell an embedding from a chat completion."""
    head = (
        f'{{"request_id": {json.dumps(request_id)}, "status": "{entry.status.value}", '
        f'"endpoint": "{endpoint_of(request_id).value}"'
    )
    if entry.status is Status.COMPLETED:
        return head + f', "response": {entry.response_json}}}'
    if entry.status is Status.CANCELLED:
        return head + "}"
    return head + f', "error": {json.dumps(entry.error)}}}'
