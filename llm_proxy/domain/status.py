"""A request's status entry: what the status store keeps and the status endpoint shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (Status.COMPLETED, Status.ERROR, Status.CANCELLED)


class WebhookState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class WebhookProgress:
    """Where a request's webhook stands, shown to users in its status as ``webhook``."""

    state: WebhookState = WebhookState.PENDING
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    next_attempt_at: int | None = None
    """Milliseconds since the epoch; set while a retry is scheduled."""

    def to_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"state": self.state.value, "attempts": self.attempts}
        if self.attempts:
            shown["last_status"] = self.last_status
            shown["last_error"] = self.last_error
        if self.next_attempt_at is not None:
            shown["next_attempt_at"] = self.next_attempt_at
        return shown

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WebhookProgress:
        next_at = data.get("next_attempt_at")
        return cls(
            state=WebhookState(data.get("state", WebhookState.PENDING.value)),
            attempts=int(data.get("attempts", 0)),
            last_status=data.get("last_status"),
            last_error=data.get("last_error"),
            next_attempt_at=None if next_at is None else int(next_at),
        )


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One upstream call of a request, as the dashboard shows it."""

    started_at: int
    """Milliseconds since the epoch."""
    duration_ms: int | None = None
    """None while the call is under way (or when its worker died during it)."""
    outcome: str = "running"
    """``ok``, the error type of a failed call, ``cancelled``, ``interrupted``, or ``running``."""

    def ended(self, outcome: str, now_ms: int) -> Attempt:
        return dataclasses.replace(self, duration_ms=max(0, now_ms - self.started_at), outcome=outcome)

    def to_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "duration_ms": self.duration_ms, "outcome": self.outcome}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        duration = data.get("duration_ms")
        return cls(
            started_at=int(data.get("started_at", 0)),
            duration_ms=None if duration is None else int(duration),
            outcome=str(data.get("outcome", "running")),
        )


@dataclass(frozen=True, kw_only=True)
class StatusEntry:
    """The client's request and the upstream's answer stay the JSON text they arrived as, so serving
    a status splices text instead of decoding and re-encoding whole completions on every poll."""

    status: Status
    request_json: str
    owner: str
    """The owner tag of the API key that submitted the request."""
    timestamp: int
    """Milliseconds since the epoch of the latest change."""
    attempts: int | None = None
    response_json: str | None = None
    error: dict[str, Any] | None = None
    webhook: WebhookProgress | None = None
    expires_at: float | None = None
    """Seconds since the epoch when a final entry disappears."""
    throttled_until: int | None = None
    """Milliseconds since the epoch until which a rate limit holds a pending request back."""
    submitted_at: int | None = None
    """Milliseconds since the epoch; None in entries stored before it was kept."""
    history: tuple[Attempt, ...] = ()
    """Each upstream attempt so far, oldest first (empty in entries stored before it was kept)."""

    def replace(self, **changes: Any) -> StatusEntry:
        return dataclasses.replace(self, **changes)

    @property
    def attempts_made(self) -> int:
        """Upstream attempts so far, whether kept on the entry or in its error."""
        if self.attempts is not None:
            return self.attempts
        return int((self.error or {}).get("attempts", 0))

    def to_dict(self) -> dict[str, Any]:
        """The stored form: a plain dict, as earlier versions stored it, so data files carry over."""
        stored: dict[str, Any] = {
            "status": self.status.value,
            "request_json": self.request_json,
            "owner": self.owner,
            "timestamp": self.timestamp,
        }
        if self.attempts is not None:
            stored["attempts"] = self.attempts
        if self.response_json is not None:
            stored["response_json"] = self.response_json
        if self.error is not None:
            stored["error"] = self.error
        if self.webhook is not None:
            stored["webhook"] = self.webhook.to_dict()
        if self.expires_at is not None:
            stored["expires_at"] = self.expires_at
        if self.throttled_until is not None:
            stored["throttled_until"] = self.throttled_until
        if self.submitted_at is not None:
            stored["submitted_at"] = self.submitted_at
        if self.history:
            stored["history"] = [attempt.to_dict() for attempt in self.history]
        return stored

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatusEntry:
        webhook = data.get("webhook")
        attempts = data.get("attempts")
        expires_at = data.get("expires_at")
        throttled_until = data.get("throttled_until")
        submitted_at = data.get("submitted_at")
        history = data.get("history")
        return cls(
            status=Status(data["status"]),
            request_json=data["request_json"],
            owner=data["owner"],
            timestamp=int(data.get("timestamp", 0)),
            attempts=None if attempts is None else int(attempts),
            response_json=data.get("response_json"),
            error=data.get("error"),
            webhook=WebhookProgress.from_dict(webhook) if isinstance(webhook, dict) else None,
            expires_at=None if expires_at is None else float(expires_at),
            throttled_until=None if throttled_until is None else int(throttled_until),
            submitted_at=None if submitted_at is None else int(submitted_at),
            history=tuple(Attempt.from_dict(a) for a in history if isinstance(a, dict))
            if isinstance(history, list)
            else (),
        )
