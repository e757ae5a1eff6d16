"""Finishing a request: the one step the worker and the web's cancel path share.

Order matters for crash safety: the final status (with its TTL and, when a webhook is owed, its
``webhook`` progress), then the owed delivery, then the ack. A crash between any two leaves the job
claimed; its lease lapses, it is handed out again and the worker's redelivery path completes
whatever is missing (the deliverer drops a duplicate delivery).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from llm_proxy.domain.status import StatusEntry, WebhookProgress, WebhookState
from llm_proxy.domain.views import webhook_json
from llm_proxy.observability.metrics import Metrics
from llm_proxy.storage.base import Claim, Delivery, JobQueue, StatusStore

log = logging.getLogger("llm_proxy.finalize")


class OwesWebhooks(Protocol):
    """The outbox itself, or the worker's deliverer (which also wakes its sending loop)."""

    def owe(self, delivery: Delivery) -> None: ...


class Finalizer:
    def __init__(
        self,
        *,
        queue: JobQueue,
        statuses: StatusStore,
        outbox: OwesWebhooks | None,
        result_ttl: float,
        announce: Callable[[str], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._queue = queue
        self._statuses = statuses
        self._outbox = outbox
        self._result_ttl = result_ttl
        self._announce = announce
        self._metrics = metrics

    def finish(
        self,
        request_id: str,
        entry: StatusEntry,
        *,
        webhook_url: str | None,
        claim: Claim | None = None,
    ) -> StatusEntry | None:
        """Store ``entry`` (a final status) for ``result_ttl``, owe its webhook, ack the claim, and
        tell whoever waits. With a claim whose lease is no longer current nothing is written and
        None is returned: the job's new holder finishes it."""
        if not entry.status.final:
            raise ValueError(f"not a final status: {entry.status.value}")
        if claim is not None and not self._queue.holds(claim):
            log.warning("request %s: lease lost before finishing; its new holder finishes it", request_id)
            return None
        owes = bool(webhook_url) and self._outbox is not None
        final = entry.replace(
            expires_at=time.time() + self._result_ttl,
            webhook=WebhookProgress() if owes else None,
        )
        self._statuses.put(request_id, final, ttl=self._result_ttl)
        self._announce(request_id)
        if self._metrics is not None:
            self._metrics.finished(final.status.value)
        if owes and webhook_url:
            self.owe_webhook(request_id, final, webhook_url)
        if claim is not None:
            self._queue.ack(claim)
        log.info("request %s: %s", request_id, final.status.value)
        return final

    def owe_webhook(self, request_id: str, entry: StatusEntry, url: str) -> None:
        if self._outbox is not None:
            self._outbox.owe(
                Delivery(
                    request_id=request_id, owner=entry.owner, url=url, payload=webhook_json(request_id, entry)
                )
            )

    def complete_redelivered(self, claim: Claim, entry: StatusEntry) -> None:
        """A job handed out again after its final status was stored: the webhook may still be owed
        (a duplicate delivery is dropped by the deliverer), and the ack was missing."""
        url = claim.job.webhook_url
        if url and entry.webhook is not None and entry.webhook.state is WebhookState.PENDING:
            self.owe_webhook(claim.job.request_id, entry, url)
        self._queue.ack(claim)
