"""The worker: the only consumer of the job queue.

``python worker.py`` runs it alone; ``python app.py`` starts it as a supervised child. It claims
jobs while fewer than ``MAX_CONCURRENT`` are in flight, runs each in its own greenlet (upstream
call, retries with backoff, status transitions) and acks it once its final status is stored. The
loop knows nothing of HTTP: it talks to a ``JobQueue``, a ``StatusStore`` and an upstream client.
"""

if __name__ == "__main__":  # the entry point patches before anything else is imported
    from gevent import monkey

    monkey.patch_all()

import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from claiming import next_claims
from metrics import Metrics
from storage import Claim, Job, JobQueue, Status, StatusStore, StorageUnavailable, now_ms
from supervisor import EXIT_LOCKED
from upstream import Outcome, backoff_delay
from views import webhook_json
from wakeup import CANCEL_PREFIX
from webhooks import WebhookDeliverer, WebhookSender

log = logging.getLogger("llm_proxy.worker")

POLL_INTERVAL = 1.0
"""How often the queue is re-read when no wake-up arrives (the wake-up is only a hint)."""
COMPACT_INTERVAL = 10.0
PURGE_INTERVAL = 60.0


class Upstream(Protocol):
    def complete(self, body: dict[str, Any]) -> Outcome: ...

    def stream(self, body: dict[str, Any], on_event: Callable[[bytes], None]) -> Outcome: ...


class Relay(Protocol):
    def send(self, event: bytes) -> None: ...

    def close(self) -> None: ...


class WebhookOutbox(Protocol):
    def enqueue(self, request_id: str, owner: str, url: str, payload: str) -> None: ...


class Waker(Protocol):
    def receive(self, timeout: float) -> list[bytes]: ...


class _Slot:
    """One job's hold on the upstream concurrency limit, given back exactly once."""

    def __init__(self, semaphore: gevent.lock.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()


class _Cancelled(Exception):
    """Raised inside a job's greenlet when its cancellation arrives."""


class _GracefulStop(Exception):
    """Raised inside a job's greenlet when shutdown's deadline passes."""


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    max_concurrent: int
    max_retries: int
    result_ttl: float
    shutdown_timeout: float
    retry_base_delay: float
    retry_max_delay: float


def status_entry(job: Job, status: Status, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "status": status.value,
        "request_json": job.body_json,
        "owner": job.owner,
        "timestamp": now_ms(),
    }
    entry.update(fields)
    return entry


class Worker:
    def __init__(
        self,
        *,
        queue: JobQueue,
        statuses: StatusStore,
        upstream: Upstream,
        settings: WorkerSettings,
        waker: Waker | None = None,
        webhooks: WebhookOutbox | None = None,
        sleep: Callable[[float], Any] = gevent.sleep,
        poll_interval: float = POLL_INTERVAL,
        announce: Callable[[str], None] = lambda request_id: None,
        metrics: Metrics | None = None,
        relay: Callable[[str], Relay] | None = None,
    ) -> None:
        self._queue = queue
        self._statuses = statuses
        self._upstream = upstream
        self._settings = settings
        self._waker = waker
        self._webhooks = webhooks
        self._sleep = sleep
        self._poll_interval = poll_interval
        self._announce = announce
        self._metrics = metrics
        self._relay = relay
        # A slot is an upstream call that may be in flight: taken when a job is claimed, given back
        # as soon as its last call is answered, so bookkeeping never delays the next call.
        self._slots = gevent.lock.BoundedSemaphore(settings.max_concurrent)
        self._jobs = gevent.pool.Group()
        self._running: dict[str, gevent.Greenlet[..., None]] = {}
        self._nudged = gevent.event.Event()
        self._stopping = gevent.event.Event()
        self._stopped = gevent.event.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish: no new claims; in-flight jobs get ``shutdown_timeout``."""
        self._stopping.set()
        self._nudged.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return bool(self._stopped.wait(timeout))

    def run(self) -> None:
        listener = gevent.spawn(self._listen) if self._waker is not None else None
        try:
            recovered = self._queue.recover()
            if recovered:
                log.info("%d interrupted request(s) are waiting again", recovered)
            self._loop()
        finally:
            self._drain()
            if listener is not None:
                listener.kill()
            self._stopped.set()

    def _listen(self) -> None:
        if self._waker is None:
            return
        while not self._stopping.is_set():
            for message in self._waker.receive(self._poll_interval):
                if message.startswith(CANCEL_PREFIX):
                    self.cancel(message[len(CANCEL_PREFIX) :].decode("ascii", "replace"))
                else:
                    self._nudged.set()

    def cancel(self, request_id: str) -> None:
        """Abort the job's upstream call (or its backoff) if it is running here."""
        running = self._running.get(request_id)
        if running is not None:
            running.kill(_Cancelled, block=False)

    def _loop(self) -> None:
        next_compact = time.monotonic() + COMPACT_INTERVAL
        next_purge = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_compact:
                next_compact = now + COMPACT_INTERVAL
                self._maintain(self._queue.compact)
            if now >= next_purge:
                next_purge = now + PURGE_INTERVAL
                self._maintain(self._statuses.purge_expired)
            if self._slots.locked():
                self._slots.wait(timeout=self._poll_interval)
                continue
            # As many as there are free slots, in one commit.
            claims = next_claims(
                self._queue,
                self._slots.counter,
                nudged=self._nudged,
                stopping=self._stopping,
                poll_interval=self._poll_interval,
                what="requests",
            )
            for claim in claims:
                self._slots.acquire()
                request_id = claim.job.request_id
                running = self._jobs.spawn(self._run_job, claim, _Slot(self._slots))
                self._running[request_id] = running
                running.link(lambda _, rid=request_id: self._running.pop(rid, None))

    def _maintain(self, task: Callable[[], int]) -> None:
        try:
            task()
        except StorageUnavailable as exc:
            log.warning("background clean-up failed, will retry: %s", exc)

    def _drain(self) -> None:
        if not self._jobs.join(timeout=self._settings.shutdown_timeout):
            log.warning(
                "%d request(s) still in flight after %.0f s; putting them back in the queue",
                len(self._jobs),
                self._settings.shutdown_timeout,
            )
            self._jobs.kill(exception=_GracefulStop, block=True, timeout=5)

    # -- one job -------------------------------------------------------------------------------

    def _run_job(self, claim: Claim, slot: "_Slot") -> None:
        job = claim.job
        try:
            self._process(claim, slot)
        except _GracefulStop:
            self._put_back(claim)
        except _Cancelled:
            slot.release()
            self._finish(claim, Status.CANCELLED, attempts=self._attempts_of(job))
        except StorageUnavailable as exc:
            log.error("request %s: storage failed, it will be retried: %s", job.request_id, exc)
            self._release_when_possible(claim)
        except Exception:
            log.exception("request %s: unexpected failure", job.request_id)
            current = self._statuses.get(job.request_id)
            if current is not None and Status(current["status"]).final:
                # It failed after its result was stored: that result stands.
                self._queue.ack(claim.ticket)
                return
            self._finish(
                claim,
                Status.ERROR,
                error={
                    "message": "the proxy failed while processing the request",
                    "type": "internal_error",
                    "attempts": self._attempts_of(job),
                },
            )
        finally:
            slot.release()

    def _release_when_possible(self, claim: Claim) -> None:
        """Hand the job back once the disk works again. Should the worker stop first, the claim is
        recovered at its next start instead."""
        delay = 1.0
        while not self._stopping.wait(delay):
            try:
                self._queue.release(claim.ticket)
                return
            except StorageUnavailable:
                delay = min(delay * 2, 30.0)

    def _attempts_of(self, job: Job) -> int:
        entry = self._statuses.get(job.request_id)
        return int(entry.get("attempts", 0)) if entry else 0

    def _process(self, claim: Claim, slot: "_Slot") -> None:
        job = claim.job
        if claim.cancel_requested:
            raise _Cancelled
        # A job handed out for the first time cannot have a status yet.
        entry = None if claim.fresh else self._statuses.get(job.request_id)
        if entry is not None and Status(entry["status"]).final:
            # Delivered again after its final status was stored: the webhook may still be owed
            # (a duplicate in the outbox is dropped by the deliverer), and the ack was missing.
            if (entry.get("webhook") or {}).get("state") == "pending":
                self._owe_webhook(job, entry)
            self._queue.ack(claim.ticket)
            return
        attempts = int(entry.get("attempts", 0)) if entry else 0
        allowed = 1 + self._settings.max_retries
        if attempts >= allowed:
            # Every earlier attempt was cut short by a dying worker: stop instead of looping.
            self._finish(
                claim,
                Status.ERROR,
                error={
                    "message": f"the request was interrupted {attempts} time(s) by a worker crash",
                    "type": "interrupted",
                    "attempts": attempts,
                },
            )
            return
        while True:
            attempts += 1
            # Stored before the call, so a crash during it counts as an attempt.
            self._statuses.put(job.request_id, status_entry(job, Status.PROCESSING, attempts=attempts))
            started = time.monotonic()
            try:
                outcome = self._call(job)
            except _GracefulStop:
                # A call cut short by shutdown does not count against the request.
                self._statuses.put(job.request_id, status_entry(job, Status.PENDING, attempts=attempts - 1))
                raise
            if self._metrics is not None:
                kind = "success" if outcome.ok else str(outcome.error.get("type", "error"))
                self._metrics.attempted(kind, time.monotonic() - started)
            if outcome.ok:
                slot.release()
                self._finish(claim, Status.COMPLETED, response_json=outcome.response_json, attempts=attempts)
                return
            if not outcome.retryable or attempts >= allowed:
                slot.release()
                self._finish(claim, Status.ERROR, error={**outcome.error, "attempts": attempts})
                return
            delay = backoff_delay(
                attempts,
                base=self._settings.retry_base_delay,
                cap=self._settings.retry_max_delay,
                retry_after=outcome.retry_after,
            )
            log.info(
                "request %s: attempt %d failed (%s), retrying in %.2f s",
                job.request_id,
                attempts,
                outcome.error.get("type"),
                delay,
            )
            if self._queue.cancel_requested(job.request_id):
                raise _Cancelled
            self._sleep(delay)

    def _call(self, job: Job) -> Outcome:
        if not (job.relay and self._relay is not None):
            return self._upstream.complete(job.body)
        relay = self._relay(job.request_id)
        try:
            return self._upstream.stream(job.body, relay.send)
        finally:
            relay.close()

    def _finish(self, claim: Claim, status: Status, **fields: Any) -> None:
        job = claim.job
        ttl = self._settings.result_ttl
        entry = status_entry(job, status, expires_at=time.time() + ttl, **fields)
        wants_webhook = bool(job.body.get("webhookUrl")) and self._webhooks is not None
        if wants_webhook:
            entry["webhook"] = {"state": "pending", "attempts": 0}
        # Status, then outbox, then ack: a crash between any two leaves the job to be handed out
        # again, and the redelivery path in _process completes whatever is missing.
        self._statuses.put(job.request_id, entry, ttl=ttl)
        self._announce(job.request_id)
        if self._metrics is not None:
            self._metrics.finished(status.value)
        if wants_webhook:
            self._owe_webhook(job, entry)
        self._queue.ack(claim.ticket)
        log.info("request %s: %s", job.request_id, status.value)

    def _owe_webhook(self, job: Job, entry: dict[str, Any]) -> None:
        if self._webhooks is not None:
            self._webhooks.enqueue(
                job.request_id, job.owner, str(job.body["webhookUrl"]), webhook_json(job.request_id, entry)
            )

    def _put_back(self, claim: Claim) -> None:
        job = claim.job
        try:
            entry = self._statuses.get(job.request_id) or {}
            if entry.get("status") != Status.PENDING.value:
                self._statuses.put(
                    job.request_id, status_entry(job, Status.PENDING, attempts=int(entry.get("attempts", 0)))
                )
            self._queue.release(claim.ticket)
        except StorageUnavailable as exc:
            log.error("request %s: could not put it back; it resumes on restart: %s", job.request_id, exc)


# -- the process ------------------------------------------------------------------------------


def acquire_lock(data_dir: Path) -> IO[str] | None:
    """Hold ``DATA_DIR/worker.lock`` for the process's life; None if another worker holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "worker.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _watch_parent(expected: int, worker: Worker) -> None:
    """An embedded worker whose web process died must not linger as an orphan."""
    while os.getppid() == expected:
        gevent.sleep(1.0)
    log.warning("the web process is gone; stopping")
    worker.stop()


def main() -> int:
    from config import ConfigError, load_from_process_env
    from logs import setup_logging
    from metrics import ENV as METRICS_ENV
    from metrics import enable_multiprocess
    from sqlite_storage import open_outbox, open_storage
    from streaming import RelayClient
    from upstream import UpstreamClient
    from wakeup import WEB, Announcer, WakeupListener, WakeupSender

    try:
        config = load_from_process_env()
    except ConfigError as exc:
        print(f"llm-proxy worker: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if not os.environ.get(METRICS_ENV):
        # Run on its own (not as web's child): share DATA_DIR/metrics with the web process.
        enable_multiprocess(config.data_dir, fresh=False)
    lock = acquire_lock(config.data_dir)
    if lock is None:
        print(
            f"llm-proxy worker: another worker is already running on DATA_DIR={config.data_dir} "
            "(two consumers of one queue would hand out requests twice); not starting.",
            file=sys.stderr,
        )
        return EXIT_LOCKED
    queue, statuses = open_storage(config.data_dir)
    upstream = UpstreamClient(
        base_url=config.openai_api_base_url,
        api_key=config.openai_api_key,
        timeout=config.request_timeout,
        pool_size=config.max_concurrent,
    )
    waker = WakeupListener(config.data_dir)
    finals = WakeupSender(config.data_dir, WEB, patience=1.0)
    announcer = Announcer(finals)
    outbox = open_outbox(config.data_dir)
    sender = WebhookSender(
        secret=config.webhook_secret,
        allow_private=config.webhook_allow_private,
        timeout=config.webhook_timeout,
    )
    metrics = Metrics()
    deliverer = WebhookDeliverer(
        outbox=outbox,
        statuses=statuses,
        sender=sender,
        retry_base=config.webhook_retry_base,
        concurrency=config.webhook_concurrency,
        metrics=metrics,
    )
    worker = Worker(
        queue=queue,
        statuses=statuses,
        upstream=upstream,
        waker=waker,
        webhooks=deliverer,
        announce=announcer.announce,
        metrics=metrics,
        relay=lambda request_id: RelayClient(config.data_dir, request_id),
        settings=WorkerSettings(
            max_concurrent=config.max_concurrent,
            max_retries=config.max_retries,
            result_ttl=config.result_ttl,
            shutdown_timeout=config.shutdown_timeout,
            retry_base_delay=config.retry_base_delay,
            retry_max_delay=config.retry_max_delay,
        ),
    )
    gevent.signal_handler(signal.SIGTERM, worker.stop)
    gevent.signal_handler(signal.SIGINT, worker.stop)
    parent = os.environ.get("LLM_PROXY_SUPERVISOR_PID")
    if parent and parent.isdigit():
        gevent.spawn(_watch_parent, int(parent), worker)
    log.info(
        "worker started: MAX_CONCURRENT=%d, upstream %s", config.max_concurrent, config.openai_api_base_url
    )
    delivering = gevent.spawn(deliverer.run)
    try:
        worker.run()
    finally:
        # Deliveries go on while in-flight requests drain, and stop only after them.
        deliverer.stop()
        delivering.kill()
        sender.close()
        outbox.close()
        waker.close()
        finals.close()
        upstream.close()
        queue.close()
        statuses.close()
        lock.close()
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
