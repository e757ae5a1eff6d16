"""The public JSON of a status entry, composed from stored JSON text.

Entries keep the client's request and the upstream's answer as the JSON text they were received
or first serialized as (``request_json``, ``response_json``), so serving a status or a webhook
splices text instead of decoding and re-encoding whole completions on every poll.
"""

from __future__ import annotations

import json
from typing import Any

_SCALARS = ("timestamp", "attempts")
_OBJECTS = ("error", "webhook")


def status_json(request_id: str, entry: dict[str, Any], queue_position: int | None = None) -> str:
    parts = [f'"request_id": {json.dumps(request_id)}', f'"status": {json.dumps(entry["status"])}']
    parts.append(f'"request": {entry["request_json"]}')
    for name in _SCALARS:
        if name in entry:
            parts.append(f'"{name}": {json.dumps(entry[name])}')
    if entry.get("response_json") is not None:
        parts.append(f'"response": {entry["response_json"]}')
    for name in _OBJECTS:
        if entry.get(name) is not None:
            parts.append(f'"{name}": {json.dumps(entry[name])}')
    if queue_position is not None:
        parts.append(f'"queue_position": {int(queue_position)}')
    return "{" + ", ".join(parts) + "}"


def webhook_json(request_id: str, entry: dict[str, Any]) -> str:
    """The seed's webhook payloads."""
    head = f'{{"request_id": {json.dumps(request_id)}, "status": {json.dumps(entry["status"])}, '
    if entry["status"] == "completed":
        return head + f'"response": {entry["response_json"]}}}'
    if entry["status"] == "cancelled":
        return head.rstrip(", ") + "}"
    return head + f'"error": {json.dumps(entry.get("error"))}}}'
