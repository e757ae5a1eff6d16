"""The rate limits and the validation in front of them, against hostile or odd input: huge token
counts, upstream headers that report a budget without saying how it refills, a limit of 0, model
names no store can keep, and the state that every model string leaves behind."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import pytest

from llm_proxy.api.validation import BodyError, validate
from llm_proxy.domain.endpoints import Endpoint
from llm_proxy.ratelimit.book import SLACK, WINDOW, Book, Ceiling, ModelState, RatePolicy
from llm_proxy.ratelimit.headers import RateReport, read_report
from llm_proxy.ratelimit.tokens import MAX_TOKENS, estimate_tokens, used_tokens
from llm_proxy.storage.base import JobQueue
from llm_proxy.worker.pacing import Limiter

T0 = 1_700_000_000.0
HUGE = 10**400
CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class OwnMemory:
    """The embedded back end's share_rates: the worker's own memory is the state."""

    def share_rates(
        self, models: Collection[str], change: Callable[[Mapping[str, str] | None], dict[str, str]]
    ) -> None:
        change(None)


def limiter(policy: RatePolicy | None = None, clock: Callable[[], float] = lambda: T0) -> Limiter:
    return Limiter(policy or RatePolicy(), cast(JobQueue, OwnMemory()), clock=clock)


# -- 1. huge token counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        (Endpoint.CHAT, {**CHAT, "max_tokens": HUGE}, "max_tokens"),
        (Endpoint.CHAT, {**CHAT, "max_completion_tokens": 2**31}, "max_completion_tokens"),
        (Endpoint.CHAT, {**CHAT, "n": HUGE}, "n"),
        (Endpoint.CHAT, {**CHAT, "max_tokens": 1e300}, "max_tokens"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "p", "max_tokens": HUGE}, "max_tokens"),
        (Endpoint.COMPLETIONS, {"model": "m", "prompt": "p", "n": 2**40}, "n"),
        (Endpoint.RESPONSES, {"model": "m", "input": "i", "max_output_tokens": HUGE}, "max_output_tokens"),
    ],
)
def test_token_counts_beyond_any_model_are_refused(
    endpoint: Endpoint, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(BodyError) as caught:
        validate(endpoint, body)
    assert [d["path"] for d in caught.value.details] == [field]


def test_the_largest_sane_token_counts_pass() -> None:
    validate(Endpoint.CHAT, {**CHAT, "max_tokens": 2**31 - 1, "n": 2**31 - 1})
    validate(Endpoint.RESPONSES, {"model": "m", "input": "i", "max_output_tokens": 2**31 - 1})


def test_the_estimate_is_clamped_and_never_raises() -> None:
    assert estimate_tokens({**CHAT, "max_tokens": HUGE}) == MAX_TOKENS
    assert estimate_tokens({**CHAT, "max_tokens": 2**31 - 1, "n": 2**31 - 1}) == MAX_TOKENS
    odd: list[Any] = [{"messages": "x"}, {"messages": [None, 5]}, {"input": [[1], None]}, {"tools": {1, 2}}]
    for body in odd:
        assert 1 <= estimate_tokens(body) <= MAX_TOKENS
    assert estimate_tokens(cast(dict[str, Any], ["not", "a", "dict"])) >= 1
    assert used_tokens('{"usage": {"total_tokens": 1' + "0" * 400 + "}}") == MAX_TOKENS


def test_a_huge_max_tokens_is_admitted_by_the_gate_without_raising() -> None:
    gate = limiter(RatePolicy(per_model={"m": Ceiling(tpm=1000)}))
    gate.begin(None)
    assert gate.admit("r1", "m", {**CHAT, "max_tokens": HUGE}) is True
    gate.end()


def test_the_gate_admits_and_logs_once_when_the_book_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Book, model: str, tokens: int, now: float) -> float | None:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(Book, "admit", broken)
    gate = limiter()
    gate.begin(None)
    with caplog.at_level(logging.ERROR):
        assert gate.admit("r1", "m", CHAT) is True
        assert gate.admit("r2", "m", CHAT) is True
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    gate.end()


def test_one_big_call_costs_at_most_the_models_token_limit() -> None:
    book = Book(RatePolicy())
    report = RateReport(
        limit_tokens=30_000, remaining_tokens=30_000, limit_requests=100, remaining_requests=100
    )
    book.observe("m", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0)
    assert book.admit("m", MAX_TOKENS, T0 + 1) is None  # the upstream decides on it
    # Held back at most a minute (the budget refills in one), not the hours 2**31 tokens would take.
    until = book.admit("m", 100, T0 + 1)
    assert until is not None and until <= T0 + 1 + 61
    assert book.admit("m", 100, until) is None


def test_a_huge_reset_does_not_hold_a_model_back_for_ever() -> None:
    book = Book(RatePolicy())
    report = RateReport(remaining_requests=0, reset_requests=1e12)
    book.observe("m", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0)
    until = book.admit("m", 1, T0)
    assert until is not None and until <= T0 + 3600


# -- 2. a budget that never refills, a limit of 0 ---------------------------------------------------


def test_a_remaining_budget_without_limit_or_reset_stops_binding_after_a_minute() -> None:
    book = Book(RatePolicy())
    report = RateReport(remaining_requests=1, remaining_tokens=10)
    book.observe("m", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0)
    assert book.admit("m", 1, T0) is None
    assert book.admit("m", 1, T0 + 1) is not None
    assert book.admit("m", 50, T0 + 2) is not None
    assert book.admit("m", 1, T0 + 59) is not None
    assert book.blocked(T0 + 30) != {}
    # Older than 60 s with nothing saying how it refills: it no longer binds.
    assert book.blocked(T0 + 61) == {}
    assert book.admit("m", 50, T0 + 61) is None


def test_a_limit_of_zero_counts_as_not_reported() -> None:
    report = read_report({"x-ratelimit-limit-requests": "0", "x-ratelimit-limit-tokens": "0"})
    assert report.limit_requests is None and report.limit_tokens is None
    assert read_report({"x-ratelimit-limit-tokens": "1e999", "x-ratelimit-remaining-tokens": "inf"}).empty
    # A state stored before (limit 0) divides by nothing either.
    stored = ModelState(limit_requests=0, limit_tokens=0, level_requests=0, level_tokens=0, level_at=T0)
    book = Book(RatePolicy(), {"m": stored})
    assert book.admit("m", 1, T0 + 1) is not None
    assert book.admit("m", 1, T0 + 61) is None
    book.observe(
        "m",
        sent_at=T0,
        estimate=1,
        report=RateReport(limit_tokens=0, remaining_tokens=5),
        status=200,
        used=None,
        now=T0 + 62,
    )
    assert isinstance(book.wait("m", 10, T0 + 62), float)


# -- 3. model names no store can keep ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model", ["a\u0000", "\u0000", "line\nbreak", "tab\t", "del\u007f", "c1\u0085", " ", 5]
)
@pytest.mark.parametrize(
    ("endpoint", "rest"),
    [
        (Endpoint.CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
        (Endpoint.EMBEDDINGS, {"input": "x"}),
        (Endpoint.RESPONSES, {"input": "x"}),
        (Endpoint.COMPLETIONS, {"prompt": "x"}),
    ],
)
def test_model_with_control_characters_is_refused_on_every_endpoint(
    endpoint: Endpoint, rest: dict[str, Any], model: Any
) -> None:
    with pytest.raises(BodyError) as caught:
        validate(endpoint, {"model": model, **rest})
    assert [d["path"] for d in caught.value.details] == ["model"]


def test_ordinary_model_names_pass() -> None:
    for model in ["gpt-4o", "ft:gpt-4o-mini:org:custom:abc123", "models/gemini 1.5", "模型"]:
        validate(Endpoint.CHAT, {**CHAT, "model": model})


# -- 4. the state each model string leaves --------------------------------------------------------


def test_a_model_with_nothing_to_share_is_dumped_empty_and_forgotten() -> None:
    book = Book(RatePolicy())
    assert book.admit("random-model-name", 10, T0) is None
    # Kept while its call is in the window (the first report must not count it twice)...
    assert book.dump(T0) == {"random-model-name": book.states["random-model-name"].to_json()}
    # ... and forgotten after: a sweep finds it even unchanged.
    assert book.dump(T0 + WINDOW + SLACK + 1, sweep=True) == {"random-model-name": "{}"}
    assert "random-model-name" not in book.states
    # Without pacing or a ceiling nothing is kept at all.
    bare = Book(RatePolicy(adaptive=False, per_model={"c": Ceiling(rpm=5)}))
    assert bare.admit("other", 10, T0) is None
    assert bare.dump(T0) == {"other": "{}"}


def test_reports_pauses_and_ceilings_are_shared_until_they_expire() -> None:
    book = Book(RatePolicy(per_model={"c": Ceiling(rpm=10)}))
    book.admit("c", 1, T0)
    book.observe("p", sent_at=T0, estimate=1, report=RateReport(retry_after=5), status=429, used=None, now=T0)
    report = RateReport(limit_requests=60, remaining_requests=10)
    book.observe("r", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0)
    dumped = book.dump(T0)
    assert set(dumped) == {"c", "p", "r"} and "{}" not in dumped.values()
    # Later, with nothing new: the pause is over, the budget full again, the ceiling's window
    # empty. A sweep writes each of them as empty, so that the store can delete them.
    assert book.dump(T0 + 120, sweep=True) == {"c": "{}", "p": "{}", "r": "{}"}
    assert book.states == {}
    assert book.dump(T0 + 121, sweep=True) == {}


def test_the_gate_shares_only_what_is_worth_sharing() -> None:
    now = [T0]
    gate = limiter(clock=lambda: now[0])
    gate.begin({})
    for n in range(20):
        assert gate.admit(f"r{n}", f"model-{n}", {**CHAT, "model": f"model-{n}"})
    states, throttles = gate.end()
    assert len(states) == 20 and throttles == {}
    # The next claim, a window later, with the state as the store kept it: every model written
    # empty (the store deletes those rows), and nothing more after that.
    now[0] = T0 + WINDOW + SLACK + 1
    gate.begin(states)
    states, _ = gate.end()
    assert states == {f"model-{n}": "{}" for n in range(20)}
    gate.begin({model: text for model, text in states.items() if text != "{}"})
    assert gate.end() == ({}, {})
