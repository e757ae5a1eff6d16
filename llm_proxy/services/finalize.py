"""Finishing a request: the one step the worker and the web's cancel path share.

The back end stores the final status (with its TTL and, when a webhook is owed, its ``webhook``
progress), owes the delivery and acks the claim (``Backend.finish``); then whoever waits is told and
the metrics count it. A crash part-way leaves the job claimed; its lease lapses, it is handed out
again and the worker's redelivery path completes whatever is missing (the deliverer drops a
duplicate delivery).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from llm_proxy.domain.endpoints import endpoint_of
from llm_proxy.domain.status import StatusEntry, WebhookProgress, WebhookState
from llm_proxy.domain.views import webhook_json
from llm_proxy.observability.metrics import Metrics
from llm_proxy.storage.base import Backend, Claim, Delivery

log = logging.getLogger("llm_proxy.finalize")


class Finalizer:
    def __init__(
        self,
        *,
        backend: Backend,
        result_ttl: float,
        announce: Callable[[str], None],
        webhooks: bool = True,
        on_owed: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self._backend = backend
        self._result_ttl = result_ttl
        self._announce = announce
        self._webhooks = webhooks
        self._on_owed = on_owed
        self._metrics = metrics

    def finish(
        self,
        request_id: str,
        entry: StatusEntry,
        *,
        webhook_url: str | None,
        claim: Claim | None = None,
        withdraw: bool = False,
    ) -> StatusEntry | None:
        """Store ``entry`` (a final status) for ``result_ttl``, owe its webhook, ack the claim, and
        tell whoever waits. With a claim whose lease is no longer current nothing is written and
        None is returned: the job's new holder finishes it."""
        if not entry.status.final:
            raise ValueError(f"not a final status: {entry.status.value}")
        owes = bool(webhook_url) and self._webhooks
        final = entry.replace(
            expires_at=time.time() + self._result_ttl,
            webhook=WebhookProgress() if owes else None,
        )
        delivery = _delivery(request_id, final, webhook_url) if owes and webhook_url else None
        finished = self._backend.finish(
            request_id, final, ttl=self._result_ttl, delivery=delivery, claim=claim, withdraw=withdraw
        )
        if not finished:
            if claim is not None:
                log.warning("request %s: lease lost before finishing; its new holder finishes it", request_id)
            return None
        self._announce(request_id)
        if self._metrics is not None:
            self._metrics.finished(final.status.value, endpoint_of(request_id).value)
        if delivery is not None:
            self._on_owed()
        log.info("request %s: %s", request_id, final.status.value)
        return final

    def complete_redelivered(self, claim: Claim, entry: StatusEntry) -> None:
        """A job handed out again after its final status was stored: the webhook may still be owed
        (a duplicate delivery is dropped by the deliverer), and the ack was missing."""
        url = claim.job.webhook_url
        if url and entry.webhook is not None and entry.webhook.state is WebhookState.PENDING:
            self._backend.outbox.owe(_delivery(claim.job.request_id, entry, url))
            self._on_owed()
        self._backend.queue.ack(claim)


def _delivery(request_id: str, entry: StatusEntry, url: str) -> Delivery:
    return Delivery(
        request_id=request_id, owner=entry.owner, url=url, payload=webhook_json(request_id, entry)
    )
