"""Prometheus metrics, correct across the web and worker processes.

Counters and the histogram live in prometheus_client's multiprocess mode: every process writes its
own files under ``DATA_DIR/metrics`` and the web process sums them when scraped. That mode is chosen
by an environment variable read when prometheus_client is imported, so ``enable_multiprocess`` runs
in the entry points before anything imports this module's metrics. Queue depth and in-flight calls
are read from the queue at scrape time: exact whichever process changed them.

A metrics file that cannot be read (junk written over it) is moved aside with a warning and left out,
instead of failing every scrape until someone deletes it.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.domain.status import Status

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DAMAGED_SUFFIX = ".damaged"
"""Appended to a metrics file moved aside: prometheus_client reads only ``*.db``."""

log = logging.getLogger("llm_proxy.metrics")


def enable_multiprocess(data_dir: Path, *, fresh: bool) -> None:
    """Point prometheus_client at ``DATA_DIR/metrics`` (emptied first when ``fresh``). Must run
    before prometheus_client is imported; child processes inherit the setting."""
    directory = data_dir / "metrics"
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)


class Metrics:
    """The counters the worker and the web process record into."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "llm_proxy_requests_total", "Requests that reached a final state.", ["status", "endpoint"]
        )
        self.upstream_attempts = Counter(
            "llm_proxy_upstream_attempts_total",
            "Upstream calls made, by outcome.",
            ["outcome", "endpoint"],
        )
        self.upstream_seconds = Histogram(
            "llm_proxy_upstream_seconds",
            "Duration of one upstream call.",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.webhook_deliveries = Counter(
            "llm_proxy_webhook_deliveries_total", "Webhook deliveries that ended, by state.", ["state"]
        )
        self.throttled_seconds = Counter(
            "llm_proxy_throttled_seconds_total",
            "Seconds during which a rate limit held a model's calls back ('*': every model).",
            ["model"],
        )
        # The worker that heard last is right: the upstream's figures are for the key, not per worker.
        self.remaining_requests = Gauge(
            "llm_proxy_ratelimit_remaining_requests",
            "Requests the upstream last reported left in its budget (x-ratelimit-remaining-requests).",
            ["model"],
            multiprocess_mode="mostrecent",
        )
        self.remaining_tokens = Gauge(
            "llm_proxy_ratelimit_remaining_tokens",
            "Tokens the upstream last reported left in its budget (x-ratelimit-remaining-tokens).",
            ["model"],
            multiprocess_mode="mostrecent",
        )
        # Known label values start at 0, so a scraper sees every series before its first event.
        # Chat's series only: the other endpoints' appear with their first request.
        chat = Endpoint.CHAT.value
        for status in Status:
            if status.final:
                self.requests.labels(status=status.value, endpoint=chat)
        for outcome in ("success", "upstream_error", "rate_limited", "timeout", "network_error"):
            self.upstream_attempts.labels(outcome=outcome, endpoint=chat)
        for state in ("delivered", "failed"):
            self.webhook_deliveries.labels(state=state)

    def finished(self, status: str, endpoint: str = Endpoint.CHAT.value) -> None:
        self.requests.labels(status=status, endpoint=endpoint).inc()

    def attempted(self, outcome: str, seconds: float, endpoint: str = Endpoint.CHAT.value) -> None:
        self.upstream_attempts.labels(outcome=outcome, endpoint=endpoint).inc()
        self.upstream_seconds.labels(endpoint=endpoint).observe(seconds)

    def throttled(self, model: str, seconds: float) -> None:
        self.throttled_seconds.labels(model=model).inc(seconds)

    def rate_remaining(self, model: str, requests: int | None, tokens: int | None) -> None:
        if requests is not None:
            self.remaining_requests.labels(model=model).set(requests)
        if tokens is not None:
            self.remaining_tokens.labels(model=model).set(tokens)

    def delivered(self, state: str) -> None:
        self.webhook_deliveries.labels(state=state).inc()


class TolerantMultiProcessCollector:
    """prometheus_client's multiprocess collector, less one failure: a single unreadable file
    failed every scrape for good."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(self._directory, "*.db"))
        try:
            metrics = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        except Exception:
            # Only when a read fails is each file read on its own, to find which one.
            readable = [path for path in files if self._readable(path)]
            metrics = MultiProcessCollector.merge(readable, accumulate=True)  # type: ignore[no-untyped-call]
        yield from metrics

    @staticmethod
    def _readable(path: str) -> bool:
        from prometheus_client.multiprocess import MultiProcessCollector

        error: Exception | None = None
        # Twice: a process may be adding a series to the file at that very moment.
        for _ in range(2):
            try:
                MultiProcessCollector.merge([path], accumulate=True)  # type: ignore[no-untyped-call]
                return True
            except FileNotFoundError:
                return False  # its process's files were just removed: nothing to report
            except Exception as exc:
                error = exc
        aside = path + DAMAGED_SUFFIX
        try:
            os.replace(path, aside)
        except OSError:
            aside = "(could not be moved aside)"
        log.warning(
            "metrics file %s cannot be read (%s: %s): moved aside to %s; the counts it held are left"
            " out of /metrics, and the process that wrote it counts again from its next start",
            path,
            type(error).__name__,
            error,
            aside,
        )
        return False


REMAINING = {
    "llm_proxy_ratelimit_remaining_requests": "remaining requests",
    "llm_proxy_ratelimit_remaining_tokens": "remaining tokens",
}


def reported_remaining() -> dict[str, dict[str, int]]:
    """What the upstream last reported left, by model and figure (``REMAINING``'s names), from
    every process's gauges; empty when metrics are not shared between processes."""
    directory = os.environ.get(ENV)
    if not directory:
        return {}
    found: dict[str, dict[str, int]] = {}
    for metric in TolerantMultiProcessCollector(directory).collect():
        figure = REMAINING.get(metric.name)
        if figure is None:
            continue
        for sample in metric.samples:
            model = sample.labels.get("model")
            if model is not None:
                found.setdefault(model, {})[figure] = int(sample.value)
    return found


def exposition(counts: Callable[[], tuple[int, int]]) -> Callable[[], bytes]:
    """A function rendering every process's counters plus live queue gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class QueueCollector:
        def collect(self) -> Iterator[Any]:
            waiting, in_flight = counts()
            yield GaugeMetricFamily(
                "llm_proxy_queue_depth", "Requests waiting to be dispatched.", value=waiting
            )
            yield GaugeMetricFamily(
                "llm_proxy_inflight",
                "Requests being processed (upstream calls and their backoff).",
                value=in_flight,
            )

    registry = CollectorRegistry()
    directory = os.environ.get(ENV)
    if directory:
        registry.register(TolerantMultiProcessCollector(directory))
    registry.register(QueueCollector())

    def render() -> bytes:
        return bytes(generate_latest(registry))

    return render
