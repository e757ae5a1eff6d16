"""The worker's loop: claims jobs into free slots, renews their leases, delivers cancellations and
nudges, and keeps the stores tidy. Each job runs in its own greenlet (``JobRunner``)."""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.event
import gevent.pool

from llm_proxy.services.draining import next_batch
from llm_proxy.storage.base import (
    Claim,
    ConcurrencyLimit,
    JobQueue,
    StatusStore,
    StorageUnavailable,
    WorkerSignals,
)
from llm_proxy.worker.pacing import Limiter
from llm_proxy.worker.runner import Cancelled, GracefulStop, JobRunner, LeaseLost

log = logging.getLogger("llm_proxy.worker")

POLL_INTERVAL = 1.0
"""How often the queue is re-read when no wake-up arrives (the wake-up is only a hint)."""
COMPACT_INTERVAL = 10.0
PURGE_INTERVAL = 60.0
LEASE_SECONDS = 60.0
"""How long a claim stays this worker's without renewal; renewed every third of it."""


def holder_name() -> str:
    """Unique per worker process, readable in the store: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, kw_only=True)
class DispatchSettings:
    shutdown_timeout: float
    poll_interval: float = POLL_INTERVAL
    lease_seconds: float = LEASE_SECONDS


class Dispatcher:
    def __init__(
        self,
        *,
        queue: JobQueue,
        statuses: StatusStore,
        limit: ConcurrencyLimit,
        runner: JobRunner,
        settings: DispatchSettings,
        stopping: gevent.event.Event,
        signals: WorkerSignals | None = None,
        holder: str | None = None,
        previous_holders_gone: bool = False,
        maintenance: tuple[Callable[[], int], ...] = (),
        heartbeat: Callable[[str], None] | None = None,
        gate: Limiter | None = None,
    ) -> None:
        self._queue = queue
        self._statuses = statuses
        self._limit = limit
        self._runner = runner
        self._settings = settings
        self._signals = signals
        self._holder = holder or holder_name()
        self._previous_holders_gone = previous_holders_gone
        self._maintenance = maintenance
        self._heartbeat = heartbeat
        self._gate = gate
        self._beating: gevent.Greenlet[..., None] | None = None
        self._jobs = gevent.pool.Group()
        self._running: dict[str, tuple[gevent.Greenlet[..., None], Claim]] = {}
        self._nudged = gevent.event.Event()
        self._stopping = stopping
        self._hurried = gevent.event.Event()
        self._stopped = gevent.event.Event()

    @property
    def holder(self) -> str:
        return self._holder

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish: no new claims; in-flight jobs get ``shutdown_timeout``."""
        if not self._stopping.is_set() and self._jobs:
            log.info(
                "stopping: waiting up to %.0f s (SHUTDOWN_TIMEOUT) for %d request(s) in flight;"
                " Ctrl-C again puts them back in the queue now",
                self._settings.shutdown_timeout,
                len(self._jobs),
            )
        self._stopping.set()
        self._nudged.set()

    @property
    def stopping(self) -> bool:
        return bool(self._stopping.is_set())

    def hurry(self) -> None:
        """Stop without waiting for the jobs in flight: they go back in the queue now."""
        if self._jobs:
            log.warning("putting %d request(s) in flight back in the queue now", len(self._jobs))
        self._hurried.set()
        self.stop()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return bool(self._stopped.wait(timeout))

    def run(self) -> None:
        helpers = [gevent.spawn(self._keep_leases)]
        if self._signals is not None:
            helpers.append(gevent.spawn(self._signals.listen, self._nudged.set, self.cancel))
        try:
            # With the embedded back end's lock, every earlier claim belongs to a dead worker.
            before = math.inf if self._previous_holders_gone else time.time()
            recovered = self._queue.requeue_lapsed(before)
            if recovered:
                log.info("%d interrupted request(s) are waiting again", recovered)
            self._loop()
        finally:
            if self._beating is not None:
                self._beating.kill(block=False)
            self._drain()
            gevent.killall(helpers)
            self._stopped.set()

    def cancel(self, request_id: str) -> None:
        """Abort the job's upstream call (or its backoff) if it is running here."""
        running = self._running.get(request_id)
        if running is not None and self._runner.cancel(request_id):
            running[0].kill(Cancelled, block=False)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_compact = time.monotonic() + COMPACT_INTERVAL
        next_purge = time.monotonic()
        # Not at once: a worker that dies within its first seconds, again and again, never looks
        # alive.
        next_beat = time.monotonic() + self._settings.lease_seconds / 3
        while not self._stopping.is_set():
            now = time.monotonic()
            beat = self._heartbeat
            if beat and now >= next_beat and (self._beating is None or self._beating.ready()):
                # From the loop itself, so a heartbeat means that claims go on; in a greenlet of
                # its own, so a slow store delays no claim.
                next_beat = now + self._settings.lease_seconds / 3
                self._beating = gevent.spawn(self._beat, beat)
            if now >= next_compact:
                next_compact = now + COMPACT_INTERVAL
                for task in (self._queue.compact, *self._maintenance):
                    self._maintain(task)
            if now >= next_purge:
                next_purge = now + PURGE_INTERVAL
                self._maintain(self._statuses.purge_expired)
            free = self._limit.free(timeout=self._settings.poll_interval)
            if not free:
                continue
            # As many as there are free slots, in one commit.
            claims = next_batch(
                functools.partial(
                    self._queue.claim_many,
                    free,
                    holder=self._holder,
                    lease_seconds=self._settings.lease_seconds,
                    gate=self._gate,
                    opening=self._runner.opening,
                ),
                nudged=self._nudged,
                stopping=self._stopping,
                poll_interval=self._poll_wait,
                what="requests",
            )
            for claim in claims:
                request_id = claim.job.request_id
                running = self._jobs.spawn(self._runner.run, claim, self._limit.hold(claim))
                self._running[request_id] = (running, claim)
                running.link(lambda _, rid=request_id: self._running.pop(rid, None))

    def _poll_wait(self) -> float:
        """How long to wait for work after a claim that took none: until a model a rate limit
        held back may go again, when that is sooner than the next poll."""
        wake_at = self._gate.wake_at if self._gate is not None else None
        if wake_at is None:
            return self._settings.poll_interval
        return max(0.0, min(self._settings.poll_interval, wake_at - time.time()))

    def _beat(self, beat: Callable[[str], None]) -> None:
        period = self._settings.lease_seconds / 3
        try:
            with gevent.Timeout(period, StorageUnavailable("recording it took too long")):
                beat(self._holder)
        except StorageUnavailable as exc:
            log.warning("cannot record the worker's heartbeat, will retry: %s", exc)

    def _maintain(self, task: Callable[[], int]) -> None:
        try:
            task()
        except StorageUnavailable as exc:
            log.warning("background clean-up failed, will retry: %s", exc)

    def _keep_leases(self) -> None:
        """Renew the running jobs' leases every third of a lease, and make lapsed ones (of workers
        that are gone) wait again. A job whose lease is no longer its own stops at once; when
        renewing fails until the leases are about to lapse, every job stops, so that a worker cut
        off from its store never goes on calling the upstream for jobs another worker may take.
        Stopped jobs' leases then lapse and the jobs wait again."""
        lease = self._settings.lease_seconds
        period = lease / 3
        renewed_at = time.monotonic()
        wait = period
        while not self._stopped.wait(wait):
            # Only jobs claimed before the renewal can be judged by its answer.
            running = list(self._running.values())
            asked_at = time.monotonic()
            try:
                # A renewal that hangs counts as failed well before the leases lapse.
                with gevent.Timeout(period, StorageUnavailable("renewing leases took too long")):
                    renewal = self._queue.renew([claim for _, claim in running], lease)
                held = renewal.held
                renewed_at, wait = asked_at, period
                for _, claim in running:
                    if claim.ticket in renewal.cancelled:
                        self.cancel(claim.job.request_id)
                self._queue.requeue_lapsed(time.time())
            except StorageUnavailable as exc:
                log.error("cannot renew leases: %s", exc)
                # Retry soon; stop every job once the leases are within a period of lapsing.
                wait = min(1.0, period)
                if time.monotonic() - renewed_at < lease - period:
                    continue
                held = set()
            for greenlet, claim in running:
                if (claim.ticket, claim.lease.token) not in held:
                    greenlet.kill(LeaseLost, block=False)

    def _drain(self) -> None:
        joined = gevent.spawn(self._jobs.join)
        gevent.wait([joined, self._hurried], timeout=self._settings.shutdown_timeout, count=1)
        joined.kill()
        if self._jobs and not self._hurried.is_set():
            log.warning(
                "%d request(s) still in flight after %.0f s; putting them back in the queue",
                len(self._jobs),
                self._settings.shutdown_timeout,
            )
        if self._jobs:
            self._jobs.kill(exception=GracefulStop, block=True, timeout=5)
