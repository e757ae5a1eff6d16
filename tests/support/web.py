"""The API in-process (webtest) on a real back end, for the integration tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent.event
from webtest import TestApp

from llm_proxy.api.app import ApiSettings, create_app
from llm_proxy.api.auth import KeyChecker
from llm_proxy.api.service import RequestService
from llm_proxy.api.waiters import Waiters
from llm_proxy.services.finalize import Finalizer
from llm_proxy.storage.base import (
    Backend,
    Claim,
    JobQueue,
    RelaySink,
    StatusStore,
    WebSignals,
)
from llm_proxy.storage.factory import open_backend
from llm_proxy.upstream.outcome import Outcome

MODELS = '{"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0, "owned_by": "t"}]}'

API_KEY = "test-key-0123456789"
OTHER_KEY = "other-key-987654321"


def claim_one(queue: JobQueue, holder: str = "test-worker", lease_seconds: float = 60.0) -> Claim | None:
    claims = queue.claim_many(1, holder=holder, lease_seconds=lease_seconds)
    return claims[0] if claims else None


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}


class RecordingSignals(WebSignals):
    """Records what the web asked of the workers; no worker runs in these tests."""

    def __init__(self) -> None:
        self.nudges = 0
        self.cancels: list[str] = []
        self._closed = gevent.event.Event()

    def work_queued(self) -> None:
        self.nudges += 1

    def cancel(self, request_id: str) -> None:
        self.cancels.append(request_id)

    def announce_final(self, request_id: str) -> None:
        pass

    def listen_finals(
        self, on_final: Callable[[str], None], on_gap: Callable[[], None] = lambda: None
    ) -> None:
        self._closed.wait()

    def open_relay(self, request_id: str) -> RelaySink:
        raise NotImplementedError("no relays without a worker")

    def close(self) -> None:
        self._closed.set()


class InProcessWeb:
    """The web side as ``llm_proxy.web.server.build_web`` wires it, with the queue and status
    store replaceable (to break them on purpose)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        max_queue: int = 100,
        queue: JobQueue | None = None,
        statuses: StatusStore | None = None,
        **settings: Any,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.backend: Backend = open_backend(data_dir=data_dir, database_url=database_url)
        self.queue = queue or self.backend.queue
        self.statuses = statuses or self.backend.statuses
        self.signals = RecordingSignals()
        self.waiters = Waiters()
        self.waiters.start(self.signals)
        self.finalizer = Finalizer(backend=self.backend, result_ttl=3600, announce=self.waiters.wake)
        self.service = RequestService(
            queue=self.queue,
            statuses=self.statuses,
            finalizer=self.finalizer,
            waiters=self.waiters,
            signals=self.signals,
            max_queue=max_queue,
            cancel_wait=0.2,
        )
        self.app = TestApp(
            create_app(
                service=self.service,
                keys=KeyChecker([API_KEY, OTHER_KEY]),
                settings=ApiSettings(**{"max_body_bytes": 16384, **settings}),
                render_metrics=lambda: b"",
                models=lambda: Outcome(response_json=MODELS),
            )
        )

    @property
    def nudges(self) -> int:
        return self.signals.nudges

    def submit(
        self,
        payload: Any = None,
        key: str = API_KEY,
        status: int | str = "*",
        headers: dict[str, str] | None = None,
    ) -> Any:
        data = payload if isinstance(payload, bytes) else json.dumps(chat() if payload is None else payload)
        return self.app.post(
            "/v1/chat/completions",
            data,
            headers={"X-API-Key": key, **(headers or {})},
            content_type="application/json",
            status=status,
        )

    def get(self, request_id: str, key: str = API_KEY) -> Any:
        return self.app.get(f"/v1/chat/completions/{request_id}", headers={"X-API-Key": key}, status="*")

    def close(self) -> None:
        self.waiters.close()
        self.signals.close()
        self.backend.close()
