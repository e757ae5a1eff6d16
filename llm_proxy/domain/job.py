"""What a client submitted, as the queue carries it."""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from llm_proxy.domain.endpoints import Endpoint, endpoint_of


def now_ms() -> int:
    return int(time.time() * 1000)


def new_request_id(endpoint: Endpoint = Endpoint.CHAT) -> str:
    return endpoint.prefix + secrets.token_urlsafe(18)  # 144 random bits


def body_digest(body: dict[str, Any]) -> str:
    """The same JSON whatever its key order or spacing gives the same digest."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything the worker needs without reading the status store."""

    request_id: str
    body: dict[str, Any]
    """The client's body exactly as sent (webhookUrl included)."""
    owner: str
    """A digest of the API key that submitted it (never the key itself)."""
    submitted_at: int = 0
    """Milliseconds since the epoch."""
    relay: bool = False
    """A client waits on the stream: the call is streamed and its events relayed to the web."""

    @functools.cached_property
    def body_json(self) -> str:
        """The body as JSON text, encoded once however many statuses are written for it."""
        return json.dumps(self.body)

    @property
    def endpoint(self) -> Endpoint:
        """Where the job goes upstream, read from its id: jobs stored before there were other
        endpoints than chat read as chat, and no back end stores anything new."""
        return endpoint_of(self.request_id)

    @property
    def webhook_url(self) -> str | None:
        url = self.body.get("webhookUrl")
        return str(url) if url else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "body": self.body,
            "owner": self.owner,
            "submitted_at": self.submitted_at,
            "relay": self.relay,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            request_id=data["request_id"],
            body=data["body"],
            owner=data["owner"],
            submitted_at=int(data.get("submitted_at", 0)),
            relay=bool(data.get("relay", False)),
        )
