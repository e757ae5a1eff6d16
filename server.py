"""The web process: wires config, storage and the API together and serves them on gevent."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.event
from gevent.pywsgi import WSGIHandler, WSGIServer

from app import ApiSettings, create_app
from auth import KeyChecker, generated_key
from config import Config, ConfigError, load_from_process_env
from http_errors import WSGIApp
from logs import setup_logging
from metrics import ENV as METRICS_ENV
from metrics import Metrics, enable_multiprocess, exposition
from sqlite_storage import open_outbox, open_storage
from storage import StorageUnavailable
from streaming import RelayServer
from supervisor import WorkerSupervisor
from waiters import Waiters
from wakeup import CANCEL_PREFIX, WEB, WakeupListener, WakeupSender

log = logging.getLogger("llm_proxy.server")

WORKER_SCRIPT = Path(__file__).resolve().parent / "worker.py"
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


def build_web(config: Config | None = None) -> tuple[WSGIApp, Web]:
    config = config or load_from_process_env()
    if not os.environ.get(METRICS_ENV):
        enable_multiprocess(config.data_dir, fresh=False)
    keys = config.api_keys or (generated_key(config.data_dir),)
    queue, statuses = open_storage(config.data_dir)
    outbox = open_outbox(config.data_dir)
    sender = WakeupSender(config.data_dir)
    # Cancellations must reach the worker; plain nudges may be dropped when its queue is full.
    canceller = WakeupSender(config.data_dir, patience=1.0)
    listener = WakeupListener(config.data_dir, WEB)
    waiters = Waiters()
    waiters.start(listener)
    relays = RelayServer(config.data_dir)
    relays.start()
    app = create_app(
        queue=queue,
        statuses=statuses,
        keys=KeyChecker(keys),
        settings=ApiSettings(
            max_body_bytes=config.max_body_bytes,
            max_queue=config.max_queue,
            webhook_allow_private=config.webhook_allow_private,
            sync_wait_max=config.sync_wait_max,
            result_ttl=config.result_ttl,
            metrics_public=config.metrics_public,
            # Both well inside SYNC_WAIT_MAX, which stays under the router's 30 s of silence.
            stream_hold=min(3.0, config.sync_wait_max / 2),
            stream_keepalive=min(10.0, config.sync_wait_max / 2),
        ),
        metrics=Metrics(),
        render_metrics=exposition(queue.counts),
        notify=sender.notify,
        waiters=waiters,
        signal_cancel=lambda request_id: canceller.notify(CANCEL_PREFIX + request_id.encode("ascii")),
        outbox=outbox,
        relays=relays,
    )
    return app, Web(
        app=app,
        config=config,
        closers=[relays, waiters, sender, canceller, listener, queue, outbox, statuses],
    )


def make_listener(host: str, port: int) -> socket.socket:
    """A listening socket with TCP_NODELAY, which accepted sockets inherit: without it gevent's
    server writes headers and body separately and a keep-alive client stalls ~40 ms on each."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.setblocking(False)
    return listener


class QuietHandler(WSGIHandler):  # type: ignore[misc]
    """No access log: pywsgi formats each line even when it has nowhere to write it."""

    def log_request(self) -> None:
        pass


def make_server(listener: socket.socket, app: WSGIApp) -> WSGIServer:
    return WSGIServer(
        listener,
        app,
        log=None,
        error_log=logging.getLogger("llm_proxy.pywsgi"),
        handler_class=QuietHandler,
    )


def run_web() -> int:
    try:
        config = load_from_process_env()
    except ConfigError as exc:
        print(f"llm-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    # Before anything imports prometheus_client; the embedded worker inherits it. A web process that
    # starts its own worker starts the counters afresh.
    enable_multiprocess(config.data_dir, fresh=config.embedded_worker)
    try:
        app, web = build_web(config)
    except (StorageUnavailable, OSError) as exc:
        print(f"llm-proxy: cannot open DATA_DIR={config.data_dir}: {exc}", file=sys.stderr)
        return 1
    host = os.environ.get("HOST", "0.0.0.0")
    try:
        listener = make_listener(host, config.port)
    except OSError as exc:
        print(f"llm-proxy: cannot listen on {host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    server = make_server(listener, app)
    supervisor: WorkerSupervisor | None = None
    if config.embedded_worker:
        supervisor = WorkerSupervisor(
            [sys.executable, str(WORKER_SCRIPT)],
            env={**os.environ, "LLM_PROXY_SUPERVISOR_PID": str(os.getpid())},
        )
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    server.start()
    if supervisor is not None:
        supervisor.start()
    log.info("listening on %s:%d (embedded worker: %s)", host, config.port, "yes" if supervisor else "no")
    stop.wait()
    log.info("shutting down")
    if supervisor is not None:
        # The worker starts draining now, while open HTTP requests finish.
        supervisor.begin_stop()
    server.stop(timeout=HTTP_DRAIN_SECONDS)
    if supervisor is not None:
        # Docker waits 10 s and Heroku 30 s before SIGKILL; the worker needs its own deadline plus
        # a little to put unfinished requests back.
        supervisor.stop(timeout=config.shutdown_timeout + 5)
    web.close()
    log.info("stopped")
    return 0
