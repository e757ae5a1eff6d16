"""What an upstream attempt leads to: finish the request, or retry it after a delay. Pure."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llm_proxy.domain.status import Status
from llm_proxy.upstream.outcome import Outcome, backoff_delay


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_retries: int
    base_delay: float
    """First backoff wait; doubles each time."""
    max_delay: float

    @property
    def allowed_attempts(self) -> int:
        return 1 + self.max_retries


@dataclass(frozen=True, kw_only=True)
class Finish:
    status: Status
    response_json: str | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class RetryAfter:
    delay: float


def decide(
    attempts: int, outcome: Outcome, policy: RetryPolicy, rand: random.Random | None = None
) -> Finish | RetryAfter:
    """After attempt number ``attempts`` (from 1) came to ``outcome``."""
    if outcome.ok:
        return Finish(status=Status.COMPLETED, response_json=outcome.response_json)
    if not outcome.retryable or attempts >= policy.allowed_attempts:
        return Finish(status=Status.ERROR, error={**outcome.error, "attempts": attempts})
    return RetryAfter(
        backoff_delay(
            attempts,
            base=policy.base_delay,
            cap=policy.max_delay,
            retry_after=outcome.retry_after,
            rand=rand,
        )
    )


def exhausted_by_crashes(attempts: int, policy: RetryPolicy) -> Finish | None:
    """Before a new attempt: every allowed one was already cut short (by dying workers), so the
    request ends instead of looping."""
    if attempts < policy.allowed_attempts:
        return None
    return Finish(
        status=Status.ERROR,
        error={
            "message": f"the request was interrupted {attempts} time(s) by a worker crash",
            "type": "interrupted",
            "attempts": attempts,
        },
    )
