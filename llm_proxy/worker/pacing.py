"""The worker's side of the rate limits: the gate its claims go through, and the check and the
lesson around each upstream call. The decisions are ``llm_proxy.ratelimit.book``'s; this keeps
the book where the back end wants it (in this process for the embedded back end, whose one worker
is the only caller; in the database for Postgres, read and written in the claiming transaction and
by ``JobQueue.share_rates``, so that every worker counts against the same limits)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from llm_proxy.domain.job import Job
from llm_proxy.observability.metrics import Metrics
from llm_proxy.ratelimit.book import GLOBAL, Book, Ceiling, RatePolicy
from llm_proxy.ratelimit.headers import read_report
from llm_proxy.ratelimit.tokens import estimate_tokens, used_tokens
from llm_proxy.storage.base import ALL_MODELS, JobQueue, RateGate
from llm_proxy.upstream.outcome import Outcome

log = logging.getLogger("llm_proxy.pacing")


def policy_of(
    *,
    adaptive: bool,
    max_rpm: int | None,
    max_tpm: int | None,
    rate_limits: tuple[tuple[str, int | None, int | None], ...],
) -> RatePolicy:
    return RatePolicy(
        adaptive=adaptive,
        total=Ceiling(max_rpm, max_tpm),
        per_model={model: Ceiling(rpm, tpm) for model, rpm, tpm in rate_limits},
    )


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


@dataclass(frozen=True)
class Permit:
    """A call admitted: what its answer is checked against."""

    model: str
    tokens: int
    at: float
    admitted: tuple[int, float] = (0, 0.0)
    """``Book.admitted`` right after its admission."""


class Limiter(RateGate):
    def __init__(
        self,
        policy: RatePolicy,
        queue: JobQueue,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._book = Book(policy)
        """The state itself (embedded back end) or the last copy read from the store."""
        self._permits: dict[str, Permit] = {}
        """Admitted by a claim, not called yet, by request id."""
        self._now = 0.0
        self._refused: dict[str, float] = {}
        self._failed = False
        """The book failed on a call once (logged then; such calls are admitted unpaced)."""
        self.wake_at: float | None = None
        """When the earliest model held back by the last claim may go again (seconds since the
        epoch); None when the last claim held none back."""

    # -- the claim's gate ------------------------------------------------------------------------

    def begin(self, shared: Mapping[str, str] | None) -> Collection[str]:
        self._now = self._clock()
        if shared is not None:
            self._book = Book.load(self._policy, shared)
        self._refused = self._book.blocked(self._now)
        return [ALL_MODELS if model == GLOBAL else model for model in self._refused]

    def admit(self, request_id: str, model: str, body: dict[str, Any]) -> bool:
        """Never raises: a call the book cannot judge goes (a bad estimate must not stop the
        queue: the claim would fail, and the next one would take the same job again)."""
        tokens = estimate_tokens(body)
        try:
            cost = self._book.cost(model, tokens)
            until = self._book.admit(model, tokens, self._now)
            admitted = self._book.admitted(model)
        except Exception:
            self._admit_failed(model)
            self._permits[request_id] = Permit(model, 1, self._now)
            return True
        if until is None:
            self._permits[request_id] = Permit(model, cost, self._now, admitted)
            return True
        self._refused[model] = until
        return False

    def end(self) -> tuple[dict[str, str], dict[str, float]]:
        for model, until in self._refused.items():
            self._count_throttled(model, until)
        self.wake_at = min(self._refused.values(), default=None)
        throttles = {
            ALL_MODELS if model == GLOBAL else model: until for model, until in self._refused.items()
        }
        return self._book.dump(self._now, sweep=True), throttles

    # -- around each call ------------------------------------------------------------------------

    def before_call(self, job: Job) -> Permit | float:
        """The permit for the job's next call, or the time (seconds since the epoch) until which
        its model is held back. The first call of a claimed job was admitted by the claim; it is
        still held back if the model was paused (a 429) since."""
        model = model_of(job.body)
        permit = self._permits.pop(job.request_id, None)
        now = self._clock()
        if permit is not None:
            cooling = self._book.cooling_until(model, now)
            return permit if cooling is None else cooling
        tokens = estimate_tokens(job.body)
        found: list[float | None] = []
        admitted: list[tuple[int, float]] = []
        costs: list[int] = []

        def admit(shared: Mapping[str, str] | None) -> dict[str, str]:
            book = self._merge(shared)
            try:
                costs.append(book.cost(model, tokens))
                found.append(book.admit(model, tokens, now))
                admitted.append(book.admitted(model))
            except Exception:
                self._admit_failed(model)
                return {}
            return book.dump(now) if shared is not None else {}

        self._queue.share_rates(self._keys(model), admit)
        until = found[0] if found else None
        if until is not None:
            self._share_throttled(model, until, now)
            return until
        return Permit(model, costs[0] if admitted else 1, now, admitted[0] if admitted else (0, 0.0))

    def after_call(self, permit: Permit, outcome: Outcome) -> None:
        """Learn from the answer: its headers, a 429, its usage."""
        report = read_report(outcome.rate_headers)
        ceilings = self._policy.total.tpm is not None or self._policy.ceiling(permit.model).tpm is not None
        used = used_tokens(outcome.response_json) if ceilings else None
        if self._metrics is not None and not report.empty:
            self._metrics.rate_remaining(permit.model, report.remaining_requests, report.remaining_tokens)
        if report.empty and outcome.status != 429 and (used is None or used == permit.tokens):
            return  # nothing to learn: no write to a shared store
        exhausted = "insufficient_quota" in (outcome.error.get("code"), outcome.error.get("type"))
        now = self._clock()

        def learn(shared: Mapping[str, str] | None) -> dict[str, str]:
            book = self._merge(shared)
            book.observe(
                permit.model,
                sent_at=permit.at,
                estimate=permit.tokens,
                report=report,
                status=outcome.status,
                used=used,
                now=now,
                exhausted=exhausted,
                admitted=permit.admitted,
            )
            return book.dump(now) if shared is not None else {}

        self._queue.share_rates(self._keys(permit.model), learn)

    def cooling_until(self, model: str) -> float | None:
        """When a pause of the model after a 429 ends (as last known here), while one lasts."""
        return self._book.cooling_until(model, self._clock())

    def forget(self, request_id: str) -> None:
        """The job ended or went back without its admitted call."""
        self._permits.pop(request_id, None)

    def held_back(self, model: str, until: float) -> None:
        """A claimed job goes back to wait because its model is held back until ``until``."""
        self._share_throttled(model, until, self._clock())

    # -- helpers ---------------------------------------------------------------------------------

    def _admit_failed(self, model: str) -> None:
        if not self._failed:
            self._failed = True
            log.exception("rate limits cannot judge a call of model %r: admitting it unpaced", model)
        else:
            log.debug("rate limits cannot judge a call of model %r: admitting it unpaced", model)

    def _keys(self, model: str) -> list[str]:
        return [GLOBAL, model] if self._policy.total.set else [model]

    def _merge(self, shared: Mapping[str, str] | None) -> Book:
        """The book to change: this process's own, refreshed with the stored state when shared."""
        if shared is not None:
            fresh = Book.load(self._policy, shared)
            self._book.states.update(fresh.states)
            self._book.changed = set()
        return self._book

    def _share_throttled(self, model: str, until: float, now: float) -> None:
        def note(shared: Mapping[str, str] | None) -> dict[str, str]:
            book = self._merge(shared)
            self._count_throttled(model, until, book, now)
            return book.dump(now) if shared is not None else {}

        self._queue.share_rates([model], note)

    def _count_throttled(
        self, model: str, until: float, book: Book | None = None, now: float | None = None
    ) -> None:
        seconds = (book or self._book).note_throttled(model, until, self._now if now is None else now)
        if seconds > 0 and self._metrics is not None:
            self._metrics.throttled(model, seconds)
