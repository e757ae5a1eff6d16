"""What ``GET /health`` reports: whether the store can be read and written, and whether a worker is
alive. Platforms restart or route around a process whose health is not 200, so only what lasts is
reported: a worker restarting for a second, or a store lock held for a moment, is not a problem.

The store is probed (``Backend.probe``: a read, a write, and the freshest worker heartbeat) at most
once per ``CACHE_SECONDS``, however often ``/health`` is polled, and never for longer than
``PROBE_TIMEOUT``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.lock

from llm_proxy.storage.base import StorageUnavailable

log = logging.getLogger("llm_proxy.health")

CACHE_SECONDS = 1.0
"""How long a result is reused: each probe costs store round trips, and /health is polled often."""
PROBE_TIMEOUT = 2.0
"""A store that has not answered the probe by then counts as unavailable (health checkers give up
after a few seconds, and a submit would wait as long)."""
WORKER_SILENCE_LEASES = 2.0
"""A worker silent this many LEASE_TIMEOUTs is gone (see ``worker_silence``)."""
MIN_WORKER_SILENCE = 5.0
"""Never less: the worker beats from its loop, which turns about once a second when idle."""


def worker_silence(lease_timeout: float) -> float:
    """Seconds without any worker heartbeat after which ``/health`` reports no worker (60 s with
    the default LEASE_TIMEOUT of 30). Workers beat every LEASE_TIMEOUT / 3, so this is six missed
    beats: a slow store or a long pause does not trip it. By then a dead worker's leases have
    lapsed a whole LEASE_TIMEOUT ago, so no other worker took its place either, while a restarted
    embedded worker (1 s later; 5 s while another one holds DATA_DIR's lock) beats well within it.
    It is also the grace period after this process starts, in which a missing heartbeat is not
    reported: a worker started alongside beats a third of a lease after its start."""
    return max(WORKER_SILENCE_LEASES * lease_timeout, MIN_WORKER_SILENCE)


@dataclass(frozen=True)
class Problem:
    check: str
    """``store`` or ``worker``."""
    message: str
    detail: str = ""
    """For the log only: /health answers anyone, and a store's error can name hosts and paths."""


@dataclass(frozen=True)
class Health:
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unavailable",
            "problems": [{"check": p.check, "message": p.message} for p in self.problems],
        }


HEALTHY = Health()


class HealthMonitor:
    """Answers ``check`` from the store's ``probe`` (a callable returning the age in seconds of
    the freshest worker heartbeat, None when there is none, or raising StorageUnavailable)."""

    def __init__(
        self,
        probe: Callable[[], float | None],
        *,
        worker_silence: float,
        cache_seconds: float = CACHE_SECONDS,
        probe_timeout: float = PROBE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._worker_silence = worker_silence
        self._cache_seconds = cache_seconds
        self._probe_timeout = probe_timeout
        self._clock = clock
        self._started = clock()
        # Requests that arrive while a probe runs wait for its answer instead of probing too.
        self._lock = gevent.lock.Semaphore()
        self._last: Health | None = None
        self._checked_at = -math.inf

    def check(self) -> Health:
        with self._lock:
            if self._last is not None and self._clock() - self._checked_at < self._cache_seconds:
                return self._last
            health = self._check_now()
            self._log_change(health)
            self._last, self._checked_at = health, self._clock()
            return health

    def _check_now(self) -> Health:
        try:
            timeout = StorageUnavailable(f"no answer within {self._probe_timeout:g} s")
            with gevent.Timeout(self._probe_timeout, timeout):
                age = self._probe()
        except StorageUnavailable as exc:
            # Whether a worker beats cannot be read then: the store is the problem to fix.
            return Health(
                (Problem("store", "the store cannot be read or written (details in the log)", str(exc)),)
            )
        up = self._clock() - self._started
        silence = self._worker_silence
        if up < silence or (age is not None and age <= silence):
            return HEALTHY
        hint = (
            "a worker is stopped, crash-looping, cut off from the store or locked out of DATA_DIR,"
            " or none runs (with EMBEDDED_WORKER=false, start one: python worker.py)"
        )
        if age is None:
            message = f"no worker has recorded a heartbeat since this process started {up:.0f} s ago: {hint}"
        else:
            message = f"no worker heartbeat for {age:.0f} s (more than {silence:g} s): {hint}"
        return Health((Problem("worker", message),))

    def _log_change(self, health: Health) -> None:
        """Once per change, not once per poll."""
        before = self._last
        if before is None and health.ok:
            return
        if before is not None and [p.check for p in before.problems] == [p.check for p in health.problems]:
            return
        if health.ok:
            log.info("healthy again")
        else:
            log.warning(
                "unhealthy: %s",
                "; ".join(
                    f"{p.check}: {p.message}" + (f" ({p.detail})" if p.detail else "")
                    for p in health.problems
                ),
            )
