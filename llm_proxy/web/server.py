"""The web process: wires config, storage and the API together and serves them on gevent."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool

from config import Config
from llm_proxy.api.app import ApiSettings, create_app
from llm_proxy.api.auth import KeyChecker, generated_key
from llm_proxy.api.http import WSGIApp
from llm_proxy.api.models import ModelList
from llm_proxy.api.service import RequestService
from llm_proxy.api.waiters import Waiters
from llm_proxy.dashboard.app import Dashboard, with_dashboard
from llm_proxy.dashboard.sessions import SignedOut
from llm_proxy.dashboard.views import rate_limit_rows
from llm_proxy.observability.metrics import ENV as METRICS_ENV
from llm_proxy.observability.metrics import Metrics, enable_multiprocess, exposition, reported_remaining
from llm_proxy.processes import CONFIG_ERROR, SUPERVISOR_PID_ENV
from llm_proxy.services.finalize import Finalizer
from llm_proxy.services.health import HealthMonitor, worker_silence
from llm_proxy.storage.base import (
    DatabaseUnusable,
    StorageDamaged,
    StorageIncompatible,
    StorageUnavailable,
)
from llm_proxy.storage.factory import open_backend
from llm_proxy.upstream.client import UpstreamClient
from llm_proxy.web.httpserver import make_listener, make_server, raise_open_files_limit
from llm_proxy.web.supervisor import WorkerSupervisor

log = logging.getLogger("llm_proxy.server")

MODELS_TIMEOUT = 30.0
"""Seconds GET /v1/models may wait for the upstream's list (REQUEST_TIMEOUT when shorter)."""
HTTP_DRAIN_SECONDS = 5.0
"""How long open HTTP requests get to finish once shutdown starts."""


@dataclass
class Web:
    app: WSGIApp
    config: Config
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for closer in self.closers:
            closer.close()


def build_web(config: Config) -> Web:
    """The API wired to the configured back end; ``Web.close`` releases everything it opened."""
    if not os.environ.get(METRICS_ENV):
        enable_multiprocess(config.data_dir, fresh=False)
    backend = open_backend(
        data_dir=config.data_dir, database_url=config.database_url, pool_size=config.database_pool_size
    )
    keys = config.api_keys or (generated_key(backend.keep_key, backend.describe_key_store()),)
    signals = backend.web_signals()
    waiters = Waiters()
    waiters.start(signals)

    def announce(request_id: str) -> None:
        waiters.wake(request_id)
        signals.announce_final(request_id)

    finalizer = Finalizer(backend=backend, result_ttl=config.result_ttl, announce=announce, metrics=Metrics())
    # Only for GET /v1/models and the Responses API's stored answers: the worker makes every
    # request's call.
    upstream = UpstreamClient(
        base_url=config.openai_api_base_url,
        api_key=config.openai_api_key,
        timeout=min(MODELS_TIMEOUT, config.request_timeout),
        pool_size=2,
    )
    service = RequestService(
        queue=backend.queue,
        statuses=backend.statuses,
        finalizer=finalizer,
        waiters=waiters,
        signals=signals,
        max_queue=config.max_queue,
    )
    app = create_app(
        service=service,
        keys=KeyChecker(keys),
        settings=ApiSettings(
            max_body_bytes=config.max_body_bytes,
            webhook_allow_private=config.webhook_allow_private,
            sync_wait_max=config.sync_wait_max,
            metrics_public=config.metrics_public,
            # Both well inside SYNC_WAIT_MAX, which stays under the router's 30 s of silence.
            stream_hold=config.sync_wait_max,  # until the first event or the end: a wait like any other
            stream_keepalive=min(10.0, config.sync_wait_max / 2),
        ),
        render_metrics=exposition(backend.queue.counts),
        signals=signals,
        health=HealthMonitor(backend.probe, worker_silence=worker_silence(config.lease_timeout)).check,
        models=ModelList(upstream.models).get,
        relay=upstream.fetch,
    )
    dashboard = Dashboard(
        service=service,
        queue=backend.queue,
        index=backend.requests,
        api_keys=keys,
        max_concurrent=config.max_concurrent,
        rate_limits=lambda: rate_limit_rows(backend.queue.throttles(), reported_remaining(), time.time()),
        signed_out=SignedOut(end=backend.end_session, ended=backend.session_ended),
    )
    app = with_dashboard(app, dashboard.wsgi())
    return Web(app=app, config=config, closers=[waiters, backend, upstream])


def run_web(config: Config, worker_command: list[str]) -> int:
    """Serve until SIGTERM or SIGINT, with the worker (``worker_command``) as a supervised child
    when EMBEDDED_WORKER is on."""
    # Before anything imports prometheus_client; the embedded worker inherits it. A web process that
    # starts its own worker starts the counters afresh.
    enable_multiprocess(config.data_dir, fresh=config.embedded_worker)
    try:
        web = build_web(config)
    except DatabaseUnusable as exc:
        print(f"llm-proxy: configuration error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except StorageDamaged as exc:
        # Like a configuration error, restarting cannot help: the data must be restored first.
        print(f"llm-proxy: cannot start on DATA_DIR={config.data_dir}: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except (StorageUnavailable, StorageIncompatible, OSError) as exc:
        print(f"llm-proxy: cannot open DATA_DIR={config.data_dir}: {exc}", file=sys.stderr)
        return 1
    host = os.environ.get("HOST", "0.0.0.0")
    try:
        listener = make_listener(host, config.port)
    except OSError as exc:
        print(f"llm-proxy: cannot listen on {host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    raise_open_files_limit()
    server = make_server(listener, web.app)
    supervisor: WorkerSupervisor | None = None
    if config.embedded_worker:
        supervisor = WorkerSupervisor(
            worker_command, env={**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
        )
    stop, hurried = gevent.event.Event(), gevent.event.Event()

    def interrupted() -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning("second Ctrl-C: requests in flight go back in the queue; exiting now")
        hurried.set()
        if supervisor is not None:
            supervisor.hurry()

    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, interrupted)
    server.start()
    if supervisor is not None:
        supervisor.start()
    log.info("listening on %s:%d (embedded worker: %s)", host, config.port, "yes" if supervisor else "no")
    stop.wait()
    log.info(
        "shutting down: open HTTP requests get %.0f s%s; Ctrl-C again to put requests in flight back"
        " in the queue and exit now",
        HTTP_DRAIN_SECONDS,
        f", the worker up to {config.shutdown_timeout:.0f} s (SHUTDOWN_TIMEOUT) to finish its calls"
        if supervisor is not None
        else "",
    )
    if supervisor is not None:
        # The worker starts draining now, while open HTTP requests finish.
        supervisor.begin_stop()
    draining = gevent.spawn(server.stop, timeout=HTTP_DRAIN_SECONDS)
    gevent.wait([draining, hurried], count=1)
    # Hurried: open HTTP requests are cut now (the listener is closed already).
    draining.kill()
    if supervisor is not None:
        # Docker waits 10 s and Heroku 30 s before SIGKILL; the worker needs its own deadline plus
        # a little to put unfinished requests back.
        supervisor.stop(timeout=config.shutdown_timeout + 5)
    web.close()
    log.info("stopped")
    return 0
