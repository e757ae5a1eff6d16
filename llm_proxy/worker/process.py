"""The worker process: ``python worker.py`` runs it alone; ``python app.py`` starts it as a
supervised child. Wires the back end, the upstream client and the webhook deliverer together."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import gevent
import gevent.event

from config import Config
from llm_proxy import processes
from llm_proxy.domain.job import now_ms
from llm_proxy.domain.status import Status, StatusEntry
from llm_proxy.observability.metrics import ENV as METRICS_ENV
from llm_proxy.observability.metrics import Metrics, enable_multiprocess
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import (
    Backend,
    DatabaseUnusable,
    StorageDamaged,
    StorageIncompatible,
    StorageUnavailable,
)
from llm_proxy.storage.factory import open_backend
from llm_proxy.upstream.client import UpstreamClient
from llm_proxy.webhooks.delivery import WebhookDeliverer
from llm_proxy.webhooks.sender import WebhookSender
from llm_proxy.worker.dispatcher import Dispatcher, DispatchSettings
from llm_proxy.worker.pacing import Limiter, policy_of
from llm_proxy.worker.retry import RetryPolicy
from llm_proxy.worker.runner import JobRunner

log = logging.getLogger("llm_proxy.worker")


def _watch_parent(expected: int, dispatcher: Dispatcher) -> None:
    """An embedded worker whose web process died must not linger as an orphan."""
    while os.getppid() == expected:
        gevent.sleep(1.0)
    log.warning("the web process is gone; stopping")
    dispatcher.stop()


def _end_lost(backend: Backend, finalizer: Finalizer) -> None:
    """End as ``error`` (type ``lost``) each request whose status says pending or processing
    although the queue no longer holds it: no worker would ever end it, and it would show as
    unfinished for good. Runs before the first claim, as the only consumer."""
    try:
        for request_id in backend.lost_requests():
            entry = backend.statuses.get(request_id)
            if entry is None or entry.status.final:
                continue
            lost = StatusEntry(
                status=Status.ERROR,
                request_json=entry.request_json,
                owner=entry.owner,
                timestamp=now_ms(),
                error={
                    "message": "the request was lost: it was no longer in the queue when the worker"
                    " started (the queue database was deleted, emptied or moved aside); submit it again",
                    "type": "lost",
                    "attempts": entry.attempts_made,
                },
            )
            body = json.loads(entry.request_json)
            url = body.get("webhookUrl") if isinstance(body, dict) else None
            if finalizer.finish(request_id, lost, webhook_url=str(url) if url else None) is not None:
                log.warning("request %s: lost (it was %s)", request_id, entry.status.value)
    except StorageUnavailable as exc:
        # Not worth a crash loop: the next start looks again.
        log.warning("could not end the lost requests now: %s", exc)


def run_worker(config: Config) -> int:
    if not os.environ.get(METRICS_ENV):
        # Run on its own (not as web's child): share DATA_DIR/metrics with the web process.
        enable_multiprocess(config.data_dir, fresh=False)
    try:
        backend = open_backend(
            data_dir=config.data_dir, database_url=config.database_url, pool_size=config.database_pool_size
        )
    except DatabaseUnusable as exc:
        print(f"llm-proxy worker: configuration error: {exc}", file=sys.stderr)
        return processes.CONFIG_ERROR
    except StorageDamaged as exc:
        # Restarting cannot help: someone must restore or move the data aside first.
        print(f"llm-proxy worker: {exc}", file=sys.stderr)
        return processes.CONFIG_ERROR
    except (StorageUnavailable, StorageIncompatible) as exc:
        print(f"llm-proxy worker: {exc}", file=sys.stderr)
        return 1
    try:
        if not backend.consumer_admitted():
            print(
                f"llm-proxy worker: another worker is already running on DATA_DIR={config.data_dir} "
                "(two consumers of one queue would hand out requests twice); not starting.",
                file=sys.stderr,
            )
            return processes.LOCKED
        return _serve(config, backend)
    finally:
        backend.close()


def _serve(config: Config, backend: Backend) -> int:
    signals = backend.worker_signals()
    metrics = Metrics()
    stopping = gevent.event.Event()
    upstream = UpstreamClient(
        base_url=config.openai_api_base_url,
        api_key=config.openai_api_key,
        timeout=config.request_timeout,
        pool_size=config.max_concurrent,
        max_response_bytes=config.max_response_bytes,
    )
    sender = WebhookSender(
        secret=config.webhook_secret,
        allow_private=config.webhook_allow_private,
        timeout=config.webhook_timeout,
    )
    deliverer = WebhookDeliverer(
        outbox=backend.outbox,
        statuses=backend.statuses,
        sender=sender,
        retry_base=config.webhook_retry_base,
        concurrency=config.webhook_concurrency,
        hold=config.lease_timeout,
        metrics=metrics,
    )
    finalizer = Finalizer(
        backend=backend,
        result_ttl=config.result_ttl,
        announce=signals.announce_final,
        on_owed=deliverer.nudge,
        metrics=metrics,
    )
    _end_lost(backend, finalizer)
    policy = policy_of(
        adaptive=config.rate_limit_adaptive,
        max_rpm=config.max_rpm,
        max_tpm=config.max_tpm,
        rate_limits=config.rate_limits,
    )
    limiter = Limiter(policy, backend.queue, metrics=metrics) if policy.active else None
    runner = JobRunner(
        queue=backend.queue,
        statuses=backend.statuses,
        upstream=upstream,
        finalizer=finalizer,
        policy=RetryPolicy(
            max_retries=config.max_retries,
            base_delay=config.retry_base_delay,
            max_delay=config.retry_max_delay,
        ),
        stopping=stopping,
        relay=signals.relay,
        metrics=metrics,
        limiter=limiter,
    )
    dispatcher = Dispatcher(
        queue=backend.queue,
        statuses=backend.statuses,
        limit=backend.concurrency_limit(config.max_concurrent),
        runner=runner,
        settings=DispatchSettings(
            shutdown_timeout=config.shutdown_timeout, lease_seconds=config.lease_timeout
        ),
        stopping=stopping,
        signals=signals,
        previous_holders_gone=backend.previous_holders_gone,
        maintenance=(backend.outbox.compact,),
        heartbeat=backend.beat,
        gate=limiter,
    )
    gevent.signal_handler(signal.SIGTERM, dispatcher.stop)
    parent = os.environ.get(processes.SUPERVISOR_PID_ENV)
    if parent and parent.isdigit():
        # The web process relays Ctrl-C: SIGTERM to stop, HURRY_SIGNAL on the second one.
        gevent.signal_handler(signal.SIGINT, lambda: None)
        gevent.signal_handler(processes.HURRY_SIGNAL, dispatcher.hurry)
        gevent.spawn(_watch_parent, int(parent), dispatcher)
    else:
        gevent.signal_handler(
            signal.SIGINT, lambda: dispatcher.hurry() if dispatcher.stopping else dispatcher.stop()
        )
    log.info(
        "worker started: MAX_CONCURRENT=%d, upstream %s", config.max_concurrent, config.openai_api_base_url
    )
    for warning in config.warnings():
        log.warning("%s", warning)
    delivering = gevent.spawn(deliverer.run)
    try:
        dispatcher.run()
    finally:
        # Deliveries go on while in-flight requests drain, and stop only after them.
        deliverer.stop()
        delivering.kill()
        sender.close()
        upstream.close()
    log.info("worker stopped")
    return 0
