"""Webhook delivery: a durable outbox drained by the worker process, retried on a fixed schedule.

The worker records the final status (with ``webhook.state = pending``) and puts the delivery in the
outbox before it acks the job, so a crash anywhere in between ends with the delivery still owed.
Each delivery runs in its own greenlet (a semaphore bounds concurrent sends), so a slow receiver
delays nobody, and none of it takes one of the ``MAX_CONCURRENT`` upstream slots. Progress is
written to the status entry's ``webhook`` object, where users can see why a webhook did not arrive.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import requests
import requests_hardened
from requests.adapters import HTTPAdapter
from requests_hardened.ip_filter import InvalidIPAddress
from standardwebhooks.webhooks import Webhook

from claiming import next_claims
from metrics import Metrics
from storage import Claim, Job, JobQueue, StatusStore, StorageUnavailable
from upstream import parse_retry_after
from webhook_safety import WebhookRefused, check_destination

log = logging.getLogger("llm_proxy.webhooks")

USER_AGENT = "llm-proxy-webhooks/1.0 (+https://github.com/llm-proxy)"
SCHEDULE = (1, 6, 24, 120, 360)
"""Waits between attempts, in multiples of WEBHOOK_RETRY_BASE (5 s, 30 s, 2 min, 10 min, 30 min)."""
JITTER = 0.2
READ_LIMIT = 1024
"""Bytes of a receiver's answer we read at most: we only need its status code."""
RETRY_AFTER_CAP = 3600.0


class WebhookState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class Attempt:
    delivered: bool = False
    final: bool = False
    """No further attempt can help (410, refused destination)."""
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None


def retry_delay(failures: int, base: float, retry_after: float | None, rand: random.Random) -> float | None:
    """Wait before the next attempt after ``failures`` failed ones; None when it is time to give up."""
    if failures > len(SCHEDULE):
        return None
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    return base * SCHEDULE[failures - 1] * rand.uniform(1 - JITTER, 1 + JITTER)


def owe_webhook(outbox: JobQueue, request_id: str, owner: str, url: str, payload: str) -> None:
    """Put a delivery of ``payload`` (JSON text) to ``url`` in the outbox; the worker delivers it."""
    job = Job(
        request_id=request_id,
        owner=owner,
        body={"url": url, "body": payload, "webhook_id": f"msg_{request_id}"},
    )
    outbox.put(job)


class WebhookSender:
    """Makes one signed POST to a checked destination, reading only the start of the answer."""

    def __init__(
        self,
        *,
        secret: str | None,
        allow_private: bool,
        timeout: float,
        resolve: Callable[..., Any] | None = None,
    ) -> None:
        self._signer = Webhook(secret) if secret else None
        self._allow_private = allow_private
        self._timeout = timeout
        self._resolve = resolve
        session: requests.Session
        if allow_private:
            session = requests.Session()
            adapter = HTTPAdapter(pool_maxsize=64, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        else:
            # Resolves, checks and pins the connection to the checked address (DNS rebinding).
            session = requests_hardened.HTTPSession(
                requests_hardened.Config(
                    ip_filter_enable=True,
                    ip_filter_allow_loopback_ips=False,
                    never_redirect=True,
                    default_timeout=(timeout, timeout),
                    user_agent_override=USER_AGENT,
                )
            )
        session.trust_env = False  # an HTTP(S)_PROXY variable must not route around the checks
        self._session = session

    def headers(self, webhook_id: str, body: str, now: float | None = None) -> dict[str, str]:
        stamp = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(stamp.timestamp())),
        }
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(webhook_id, stamp, body)
        return headers

    def send(self, url: str, webhook_id: str, body: str) -> Attempt:
        if not self._allow_private:
            try:
                if self._resolve is not None:
                    check_destination(url, self._resolve)
                else:
                    check_destination(url)
            except WebhookRefused as exc:
                return Attempt(final=True, error=f"refused: {exc}")
        deadline = gevent.Timeout(self._timeout)
        deadline.start()
        try:
            reply = self._session.post(
                url,
                data=body.encode("utf-8"),
                headers=self.headers(webhook_id, body),
                timeout=(self._timeout, self._timeout),
                allow_redirects=False,
                stream=True,
            )
            try:
                reply.raw.read(READ_LIMIT, decode_content=False)
            finally:
                reply.close()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            return Attempt(error=f"timeout: no answer within {self._timeout:g} s")
        except InvalidIPAddress as exc:
            return Attempt(final=True, error=f"refused: the webhook host resolves to {exc}, not public")
        except requests.Timeout:
            return Attempt(error=f"timeout: no answer within {self._timeout:g} s")
        except requests.RequestException as exc:
            return Attempt(error=f"connection failed ({type(exc).__name__})")
        finally:
            deadline.close()
        status = reply.status_code
        if 200 <= status < 300:
            return Attempt(delivered=True, status=status)
        if status == 410:
            return Attempt(final=True, status=status, error="the receiver answered 410 Gone")
        retry_after = parse_retry_after(reply.headers) if status in (429, 503) else None
        return Attempt(status=status, error=f"the receiver answered HTTP {status}", retry_after=retry_after)

    def close(self) -> None:
        self._session.close()


class Sender(Protocol):
    def send(self, url: str, webhook_id: str, body: str) -> Attempt: ...


class WebhookDeliverer:
    def __init__(
        self,
        *,
        outbox: JobQueue,
        statuses: StatusStore,
        sender: Sender,
        retry_base: float,
        concurrency: int,
        poll_interval: float = 1.0,
        rand: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._outbox = outbox
        self._statuses = statuses
        self._sender = sender
        self._retry_base = retry_base
        self._sending = gevent.lock.BoundedSemaphore(concurrency)
        self._poll_interval = poll_interval
        self._rand = rand or random.Random()  # noqa: S311 - jitter, not secrets
        self._metrics = metrics
        self._group = gevent.pool.Group()
        self._active: set[str] = set()
        self._nudged = gevent.event.Event()
        self._stopping = gevent.event.Event()

    def enqueue(self, request_id: str, owner: str, url: str, payload: str) -> None:
        """Owe a delivery of this JSON (durably; raises StorageUnavailable if it could not be recorded)."""
        owe_webhook(self._outbox, request_id, owner, url, payload)
        self._nudged.set()

    def stop(self) -> None:
        """Stop sending. Unfinished deliveries stay in the outbox and resume on the next start."""
        self._stopping.set()
        self._nudged.set()
        self._group.kill(block=True, timeout=5)

    def run(self) -> None:
        recovered = self._outbox.recover()
        if recovered:
            log.info("%d webhook delivery(ies) resumed", recovered)
        while not self._stopping.is_set():
            claims = next_claims(
                self._outbox,
                100,
                nudged=self._nudged,
                stopping=self._stopping,
                poll_interval=self._poll_interval,
                what="webhook deliveries",
            )
            for claim in claims:
                self._group.spawn(self._deliver, claim)

    def _deliver(self, claim: Claim) -> None:
        request_id = claim.job.request_id
        try:
            if request_id in self._active:
                # A second copy of a delivery already under way (re-enqueued after a crash).
                self._outbox.ack(claim.ticket)
                return
            self._active.add(request_id)
            try:
                self._deliver_one(claim)
            finally:
                self._active.discard(request_id)
        except StorageUnavailable as exc:
            log.error("webhook for %s: storage failed; it resumes on restart: %s", request_id, exc)

    def _deliver_one(self, claim: Claim) -> None:
        job = claim.job
        entry = self._statuses.get(job.request_id) or {}
        state = dict(entry.get("webhook") or {"state": WebhookState.PENDING.value, "attempts": 0})
        if state.get("state") != WebhookState.PENDING.value:
            self._outbox.ack(claim.ticket)
            return
        while True:
            wait = float(state.get("next_attempt_at", 0)) / 1000.0 - time.time()
            if wait > 0:
                gevent.sleep(wait)
            with self._sending:
                attempt = self._sender.send(job.body["url"], job.body["webhook_id"], job.body["body"])
            state["attempts"] = int(state.get("attempts", 0)) + 1
            state["last_status"] = attempt.status
            state["last_error"] = attempt.error
            state.pop("next_attempt_at", None)
            delay = (
                None
                if attempt.delivered or attempt.final
                else retry_delay(state["attempts"], self._retry_base, attempt.retry_after, self._rand)
            )
            if delay is None:
                state["state"] = (WebhookState.DELIVERED if attempt.delivered else WebhookState.FAILED).value
                self._record(job.request_id, state)
                self._outbox.ack(claim.ticket)
                if self._metrics is not None:
                    self._metrics.delivered(state["state"])
                log.info(
                    "webhook for %s: %s after %d attempt(s)%s",
                    job.request_id,
                    state["state"],
                    state["attempts"],
                    f" ({attempt.error})" if attempt.error else "",
                )
                return
            state["next_attempt_at"] = int((time.time() + delay) * 1000)
            self._record(job.request_id, state)
            log.info(
                "webhook for %s: attempt %d failed (%s), next in %.1f s",
                job.request_id,
                state["attempts"],
                attempt.error,
                delay,
            )

    def _record(self, request_id: str, state: dict[str, Any]) -> None:
        entry = self._statuses.get(request_id)
        if entry is None:
            return  # the result expired; the delivery goes on without a place to report
        entry["webhook"] = state
        ttl = float(entry.get("expires_at", 0)) - time.time()
        self._statuses.put(request_id, entry, ttl=max(ttl, 1.0))
