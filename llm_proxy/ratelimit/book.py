"""Each model's rate-limit state and the decision whether a call may go now. Pure: the caller
passes the time (seconds since the epoch, so that several workers sharing the state through a
database agree on it) and keeps the state where its back end wants it (``dump`` / ``load``).

Two kinds of limit are kept per model, and a pseudo-model ``*`` for the whole upstream:

- ceilings of our own (MAX_RPM / MAX_TPM / RATE_LIMITS): an exact log of the calls admitted and
  their tokens, grouped into 50 ms steps (stamped at the step's end, so an entry leaves the window
  no earlier than its call); a call goes only when the calls and tokens of the last
  ``WINDOW + SLACK`` seconds leave room for it. The slack covers the time between admitting a call
  and its arrival upstream, so that no 60 s window as the upstream sees it holds more.
- the upstream's own budget (adaptive pacing): the last reported remaining requests and tokens,
  less what was admitted since the reporting call went out, refilled continuously at limit / 60
  per second as OpenAI's buckets are; a call goes while the budget stays above a reserve of
  ``RESERVE`` of the limit. A 429 stops every call of the model until its Retry-After (or the
  exhausted budget's reset).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llm_proxy.ratelimit.headers import RateReport
from llm_proxy.ratelimit.tokens import MAX_TOKENS

GLOBAL = "*"
"""The key of MAX_RPM / MAX_TPM, counted over every model."""
WINDOW = 60.0
SLACK = 1.0
STEP = 0.05
"""Admissions are logged in steps this long (bounding the log to (WINDOW + SLACK) / STEP entries)."""
RESERVE = 0.02
"""Part of a reported limit left unused (at least 1), so that calls of other clients of the same
key, and answers still on their way, do not run the budget into zero."""
DEFAULT_COOLDOWN = 1.0
"""Pause after a 429 that says neither when to retry nor which budget is exhausted."""
MAX_COOLDOWN = 3600.0
"""The longest pause after a 429, and the furthest reset of a budget believed."""
STALE = WINDOW
"""A reported budget that says neither its limit nor its reset binds no longer than this after
it was last known (else, with no call admitted, no new report would ever come to lift it)."""


@dataclass(frozen=True)
class Ceiling:
    rpm: int | None = None
    tpm: int | None = None

    @property
    def set(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True, kw_only=True)
class RatePolicy:
    adaptive: bool = True
    """Pace by the upstream's headers and pause a model for everybody on a 429."""
    total: Ceiling = Ceiling()
    per_model: Mapping[str, Ceiling] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.adaptive or self.total.set or any(c.set for c in self.per_model.values())

    def ceiling(self, key: str) -> Ceiling:
        return self.total if key == GLOBAL else self.per_model.get(key, Ceiling())


@dataclass(kw_only=True)
class ModelState:
    log: list[list[float]] = field(default_factory=list)
    """[step end, calls, tokens] of the admissions of the last WINDOW + SLACK seconds, oldest first."""
    limit_requests: int | None = None
    limit_tokens: int | None = None
    level_requests: float | None = None
    """The upstream's remaining requests as estimated at ``level_at`` (None: unknown, no pacing)."""
    level_tokens: float | None = None
    level_at: float = 0.0
    reset_requests_at: float | None = None
    """When the budget is whole again, for a budget whose limit was not reported."""
    reset_tokens_at: float | None = None
    cooldown_until: float = 0.0
    remaining_requests: int | None = None
    """As last reported, for the metrics."""
    remaining_tokens: int | None = None
    throttled_through: float = 0.0
    """Throttled time is counted up to here (for the metrics, once across workers)."""
    admitted_calls: int = 0
    """Calls admitted so far, ever: an answer's figures leave out the calls admitted after its own."""
    admitted_tokens: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "log": self.log,
                "lr": self.limit_requests,
                "lt": self.limit_tokens,
                "vr": self.level_requests,
                "vt": self.level_tokens,
                "va": self.level_at,
                "rr": self.reset_requests_at,
                "rt": self.reset_tokens_at,
                "cd": self.cooldown_until,
                "mr": self.remaining_requests,
                "mt": self.remaining_tokens,
                "tt": self.throttled_through,
                "ac": self.admitted_calls,
                "at": self.admitted_tokens,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelState:
        data = json.loads(text)
        return cls(
            log=[[float(x) for x in entry] for entry in data.get("log", [])],
            limit_requests=data.get("lr"),
            limit_tokens=data.get("lt"),
            level_requests=data.get("vr"),
            level_tokens=data.get("vt"),
            level_at=float(data.get("va", 0.0)),
            reset_requests_at=data.get("rr"),
            reset_tokens_at=data.get("rt"),
            cooldown_until=float(data.get("cd", 0.0)),
            remaining_requests=data.get("mr"),
            remaining_tokens=data.get("mt"),
            throttled_through=float(data.get("tt", 0.0)),
            admitted_calls=int(data.get("ac", 0)),
            admitted_tokens=float(data.get("at", 0.0)),
        )


def _step(t: float) -> float:
    return math.ceil(t / STEP) * STEP


def _known(limit: int | None) -> int | None:
    """A limit that says how a budget refills (a limit <= 0, as a state stored before may hold,
    says nothing and would be divided by)."""
    return limit if limit is not None and limit > 0 else None


def _level(
    level: float | None, limit: int | None, reset_at: float | None, since: float, now: float
) -> float | None:
    """A budget reported at ``since`` as it stands at ``now``: refilled at limit / 60 per second;
    None (unknown: it binds nothing) once its reset is past, or, when neither its limit nor its
    reset is known, once it is older than STALE."""
    if level is None:
        return None
    limit = _known(limit)
    if limit is not None:
        # Never more than one whole budget in debt (each call costs at most the limit).
        level = max(level, -float(limit))
        return min(float(limit), level + limit / WINDOW * max(0.0, now - since))
    if reset_at is not None:
        return None if now >= reset_at else level
    return None if now - since > STALE else level


def _budget_wait(
    level: float | None, limit: int | None, reset_at: float | None, need: float, now: float
) -> float:
    """Seconds until a budget at ``level`` (now) holds ``need`` above its reserve."""
    limit = _known(limit)
    if level is None:
        return 0.0
    if limit is None:
        return 0.0 if level >= need else max(0.0, (reset_at or now + DEFAULT_COOLDOWN) - now)
    # A call bigger than the whole budget goes once the budget is full (the upstream decides).
    # At least one in reserve: it costs only the last call of a first burst, not the paced rate,
    # and covers calls whose answers are still on their way.
    target = min(float(limit), need + max(1, math.floor(limit * RESERVE)))
    if level >= target:
        return 0.0
    return (target - level) / (limit / WINDOW)


class Book:
    """The states of the models seen, and the decisions taken on them."""

    def __init__(self, policy: RatePolicy, states: Mapping[str, ModelState] | None = None) -> None:
        self.policy = policy
        self.states: dict[str, ModelState] = dict(states or {})
        self.changed: set[str] = set()

    # -- keeping ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, policy: RatePolicy, stored: Mapping[str, str]) -> Book:
        return cls(policy, {key: ModelState.from_json(text) for key, text in stored.items()})

    def dump(self, now: float | None = None, *, sweep: bool = False) -> dict[str, str]:
        """The states changed since this book was made or last dumped. Given ``now``, a state
        with nothing worth sharing then (no report that still binds, no pause, no throttled time
        still to count, no calls in its window) is dumped as ``{}`` and
        dropped from the book, so that a store can forget the model; ``sweep``: every such state
        of the book, changed or not (for a book just loaded whole from its store)."""
        keys = set(self.changed)
        if now is not None and sweep:
            keys.update(key for key, state in self.states.items() if state != ModelState())
        dumped: dict[str, str] = {}
        for key in keys:
            state = self.states.get(key)
            if state is None:
                continue
            if now is not None and not self._worth_sharing(key, state, now):
                del self.states[key]
                dumped[key] = "{}"
            else:
                dumped[key] = state.to_json()
        self.changed = set()
        return dumped

    def _worth_sharing(self, key: str, state: ModelState, now: float) -> bool:
        if state.cooldown_until > now or state.throttled_through > now:
            return True
        # Calls in the window: a ceiling counts them, and the first report after them must not
        # count the ones still on their way (``admitted``). Gone a window after the last one.
        if (self.policy.adaptive or self.policy.ceiling(key).set) and any(
            entry[0] > now - WINDOW - SLACK for entry in state.log
        ):
            return True
        for level, limit, reset_at in (
            (state.level_requests, state.limit_requests, state.reset_requests_at),
            (state.level_tokens, state.limit_tokens, state.reset_tokens_at),
        ):
            left = _level(level, limit, reset_at, state.level_at, now)
            if left is not None and (_known(limit) is None or left < float(limit or 0)):
                return True
        return False

    def _state(self, key: str) -> ModelState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = ModelState()
        return state

    # -- deciding --------------------------------------------------------------------------------

    def _keys(self, model: str) -> tuple[str, ...]:
        return (GLOBAL, model) if self.policy.total.set else (model,)

    def cost(self, model: str, tokens: int) -> int:
        """What a call estimated at ``tokens`` counts for: at most MAX_TOKENS, and at most the
        model's reported token limit (the upstream takes or refuses a call bigger than its whole
        budget; it must not put the budget hours into debt for every caller of the model)."""
        cost = max(0, min(int(tokens), MAX_TOKENS))
        state = self.states.get(model)
        limit = None if state is None else _known(state.limit_tokens)
        return cost if limit is None else min(cost, limit)

    def _ceiling_wait(self, key: str, tokens: int, now: float) -> float:
        ceiling = self.policy.ceiling(key)
        if not ceiling.set:
            return 0.0
        state = self.states.get(key)
        if state is None:
            return 0.0
        horizon = now - WINDOW - SLACK
        live = [entry for entry in state.log if entry[0] > horizon]
        calls = sum(entry[1] for entry in live)
        used = sum(entry[2] for entry in live)
        over_calls = calls + 1 - ceiling.rpm if ceiling.rpm is not None else 0
        over_tokens = used + tokens - ceiling.tpm if ceiling.tpm is not None else 0
        if over_calls <= 0 and over_tokens <= 0:
            return 0.0
        if ceiling.tpm is not None and tokens > ceiling.tpm:
            # It can never fit: it goes alone, once the window is empty.
            over_tokens = used
            if over_calls <= 0 and over_tokens <= 0:
                return 0.0
        freed_calls = freed_tokens = 0.0
        for at, entry_calls, entry_tokens in live:
            freed_calls += entry_calls
            freed_tokens += entry_tokens
            if freed_calls >= over_calls and freed_tokens >= over_tokens:
                # A hair past it: the entry has surely left the window then, floats or not.
                return at + WINDOW + SLACK - now + 1e-6
        return WINDOW + SLACK  # unreachable: the whole window frees everything

    def _adaptive_wait(self, model: str, tokens: int, now: float) -> float:
        if not self.policy.adaptive or model == GLOBAL:
            return 0.0
        state = self.states.get(model)
        if state is None:
            return 0.0
        wait = max(0.0, state.cooldown_until - now)
        requests = _level(
            state.level_requests, state.limit_requests, state.reset_requests_at, state.level_at, now
        )
        wait = max(wait, _budget_wait(requests, state.limit_requests, state.reset_requests_at, 1, now))
        tokens_left = _level(
            state.level_tokens, state.limit_tokens, state.reset_tokens_at, state.level_at, now
        )
        return max(wait, _budget_wait(tokens_left, state.limit_tokens, state.reset_tokens_at, tokens, now))

    def wait(self, model: str, tokens: int, now: float) -> float:
        """Seconds until a call of ``model`` costing ``tokens`` may go (0: now)."""
        tokens = self.cost(model, tokens)
        return max(
            [self._adaptive_wait(model, tokens, now)]
            + [self._ceiling_wait(key, tokens, now) for key in self._keys(model)]
        )

    def admit(self, model: str, tokens: int, now: float) -> float | None:
        """Record the call and return None when it may go now; else return the time (seconds
        since the epoch) from which it may, recording nothing. It counts for ``cost(model,
        tokens)``."""
        tokens = self.cost(model, tokens)
        wait = self.wait(model, tokens, now)
        if wait > 0:
            return now + wait
        for key in {*self._keys(model), model}:
            state = self._state(key)
            self._trim(state, now)
            at = _step(now)
            if state.log and state.log[-1][0] == at:
                state.log[-1][1] += 1
                state.log[-1][2] += tokens
            else:
                state.log.append([at, 1.0, float(tokens)])
            if key != GLOBAL:
                self._spend(state, now, 1, tokens)
                state.admitted_calls += 1
                state.admitted_tokens += tokens
            self.changed.add(key)
        return None

    def admitted(self, model: str) -> tuple[int, float]:
        """The calls and tokens admitted for the model so far: taken right after a call's
        admission, it tells its answer's figures from the calls admitted after it."""
        state = self.states.get(model)
        return (0, 0.0) if state is None else (state.admitted_calls, state.admitted_tokens)

    def blocked(self, now: float, models: Iterable[str] | None = None) -> dict[str, float]:
        """The models (of those known, or of ``models``) that cannot take even a one-token call now,
        with the time they may; ``*`` among them when no call at all may go."""
        found: dict[str, float] = {}
        if self.policy.total.set:
            wait = self._ceiling_wait(GLOBAL, 1, now)
            if wait > 0:
                found[GLOBAL] = now + wait
        for model in models if models is not None else list(self.states):
            if model != GLOBAL:
                wait = self.wait(model, 1, now)
                if wait > 0:
                    found[model] = now + wait
        return found

    def cooling_until(self, model: str, now: float) -> float | None:
        """When a pause of the model after a 429 ends, while one lasts."""
        state = self.states.get(model)
        if not self.policy.adaptive or state is None or state.cooldown_until <= now:
            return None
        return state.cooldown_until

    # -- learning --------------------------------------------------------------------------------

    def observe(
        self,
        model: str,
        *,
        sent_at: float,
        estimate: int,
        report: RateReport,
        status: int | None,
        used: int | None,
        now: float,
        exhausted: bool = False,
        admitted: tuple[int, float] | None = None,
    ) -> None:
        """What the answer to a call admitted at ``sent_at`` (estimated at ``estimate`` tokens)
        said: its headers, its HTTP status, its usage. ``exhausted``: a 429 that waiting cannot
        fix (insufficient quota), which pauses nothing. ``admitted``: ``admitted(model)`` right
        after the call's admission."""
        if used is not None and used != estimate:
            for key in {*self._keys(model), model}:
                state = self.states.get(key)
                if state is None:
                    continue
                for entry in state.log:
                    if entry[0] == _step(sent_at):
                        entry[2] = max(0.0, entry[2] + used - estimate)
                        self.changed.add(key)
                        break
        if not self.policy.adaptive:
            return
        state = self._state(model)
        if not report.empty:
            self._learn(state, report, sent_at, now, admitted)
            self.changed.add(model)
        if status == 429 and not exhausted:
            pause = report.retry_after
            if pause is None and report.remaining_requests == 0:
                pause = report.reset_requests
            if pause is None and report.remaining_tokens == 0:
                pause = report.reset_tokens
            until = now + min(MAX_COOLDOWN, max(pause if pause is not None else DEFAULT_COOLDOWN, STEP))
            state.cooldown_until = max(state.cooldown_until, until)
            self.changed.add(model)

    def _learn(
        self,
        state: ModelState,
        report: RateReport,
        sent_at: float,
        now: float,
        admitted: tuple[int, float] | None,
    ) -> None:
        # What was admitted after the reporting call is not in its figures yet (the upstream
        # counts a call when it arrives).
        if admitted is not None:
            later_calls = max(0.0, float(state.admitted_calls - admitted[0]))
            later_tokens = max(0.0, state.admitted_tokens - admitted[1])
        else:
            later = [entry for entry in state.log if entry[0] > _step(sent_at)]
            later_calls = sum(entry[1] for entry in later)
            later_tokens = sum(entry[2] for entry in later)
        requests = _level(
            state.level_requests, state.limit_requests, state.reset_requests_at, state.level_at, now
        )
        tokens = _level(state.level_tokens, state.limit_tokens, state.reset_tokens_at, state.level_at, now)
        if _known(report.limit_requests) is not None:
            state.limit_requests = report.limit_requests
        if _known(report.limit_tokens) is not None:
            state.limit_tokens = report.limit_tokens
        if report.remaining_requests is not None:
            state.remaining_requests = report.remaining_requests
            requests = report.remaining_requests - later_calls
            if report.reset_requests is not None:
                state.reset_requests_at = now + min(report.reset_requests, MAX_COOLDOWN)
        if report.remaining_tokens is not None:
            state.remaining_tokens = report.remaining_tokens
            tokens = report.remaining_tokens - later_tokens
            if report.reset_tokens is not None:
                state.reset_tokens_at = now + min(report.reset_tokens, MAX_COOLDOWN)
        state.level_requests, state.level_tokens, state.level_at = requests, tokens, now

    def note_throttled(self, model: str, until: float, now: float) -> float:
        """Seconds the model is newly held back until ``until`` (each second counted once, by
        whichever worker notes it first)."""
        state = self._state(model)
        start = max(now, state.throttled_through)
        if until <= start:
            return 0.0
        state.throttled_through = until
        self.changed.add(model)
        return until - start

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _trim(state: ModelState, now: float) -> None:
        horizon = now - WINDOW - SLACK
        if state.log and state.log[0][0] <= horizon:
            state.log = [entry for entry in state.log if entry[0] > horizon]

    @staticmethod
    def _spend(state: ModelState, now: float, calls: int, tokens: int) -> None:
        if state.level_requests is None and state.level_tokens is None:
            return
        requests = _level(
            state.level_requests, state.limit_requests, state.reset_requests_at, state.level_at, now
        )
        left = _level(state.level_tokens, state.limit_tokens, state.reset_tokens_at, state.level_at, now)
        state.level_requests = None if requests is None else requests - calls
        state.level_tokens = None if left is None else left - tokens
        state.level_at = now
