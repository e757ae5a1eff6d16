"""The drain step shared by the worker's job loop and the webhook outbox loop."""

from __future__ import annotations

import logging

import gevent.event

from storage import Claim, JobQueue, StorageUnavailable

log = logging.getLogger("llm_proxy.claiming")

STORAGE_RETRY = 1.0
"""Seconds to wait after the queue could not be read."""


def next_claims(
    queue: JobQueue,
    limit: int,
    *,
    nudged: gevent.event.Event,
    stopping: gevent.event.Event,
    poll_interval: float,
    what: str,
) -> list[Claim]:
    """Up to ``limit`` claims; when there are none, return [] after a nudge or ``poll_interval``
    (the nudge is only a hint), and after ``STORAGE_RETRY`` when the queue cannot be read."""
    nudged.clear()
    try:
        claims = queue.claim_many(limit)
    except StorageUnavailable as exc:
        log.error("cannot claim %s, retrying in %.0f s: %s", what, STORAGE_RETRY, exc)
        stopping.wait(STORAGE_RETRY)
        return []
    if not claims:
        nudged.wait(poll_interval)
    return claims
