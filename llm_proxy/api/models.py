"""``GET /v1/models``: the upstream's list, relayed and kept for a short while.

SDKs and tools list the models at start, sometimes on every client they build; without a cache
each of those calls would be one more upstream request on the same key's rate limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent.lock

from llm_proxy.upstream.outcome import Outcome

MODELS_TTL = 60.0
"""Seconds a successful list is reused: new models appear within a minute."""


class ModelList:
    """The upstream's model list, fetched at most once per ``ttl`` while it answers; failures are
    not kept, so the next caller tries again."""

    def __init__(
        self,
        fetch: Callable[[], Outcome],
        *,
        ttl: float = MODELS_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._kept: Outcome | None = None
        self._until = 0.0
        # Callers arriving while a fetch is under way wait for it instead of each fetching.
        self._fetching = gevent.lock.Semaphore()

    def get(self) -> Outcome:
        with self._fetching:
            if self._kept is not None and self._clock() < self._until:
                return self._kept
            outcome = self._fetch()
            if outcome.ok:
                self._kept, self._until = outcome, self._clock() + self._ttl
            return outcome
