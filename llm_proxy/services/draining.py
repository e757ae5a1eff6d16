"""Taking work in batches, waiting for a nudge (or a poll interval) when there is none."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import gevent.event

from llm_proxy.storage.base import StorageUnavailable

log = logging.getLogger("llm_proxy.draining")
T = TypeVar("T")

STORAGE_RETRY = 1.0
"""Seconds to wait after the store could not be read."""


def next_batch(
    take: Callable[[], list[T]],
    *,
    nudged: gevent.event.Event,
    stopping: gevent.event.Event,
    poll_interval: float | Callable[[], float],
    what: str,
) -> list[T]:
    """What ``take`` returns; when that is nothing, return [] after a nudge or ``poll_interval``
    (the nudge is only a hint), and after ``STORAGE_RETRY`` when the store cannot be read. A
    callable ``poll_interval`` is asked after ``take`` (a rate limit may say when work can go)."""
    nudged.clear()
    try:
        batch = take()
    except StorageUnavailable as exc:
        log.error("cannot take %s, retrying in %.0f s: %s", what, STORAGE_RETRY, exc)
        stopping.wait(STORAGE_RETRY)
        return []
    if not batch:
        nudged.wait(poll_interval() if callable(poll_interval) else poll_interval)
    return batch
