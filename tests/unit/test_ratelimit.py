"""The rate-limit logic: header parsing, token estimates, ceilings, pacing and cooldowns."""

from __future__ import annotations

import pytest

from llm_proxy.ratelimit.book import GLOBAL, SLACK, WINDOW, Book, Ceiling, ModelState, RatePolicy
from llm_proxy.ratelimit.headers import RateReport, parse_duration, read_report
from llm_proxy.ratelimit.tokens import estimate_tokens, used_tokens

T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("2.5", 2.5),
        ("7m12.5s", 432.5),
        ("150us", 0.00015),
    ],
)
def test_durations_as_openai_sends_them(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "soon", "1x", "s", "-1s", "1s junk", "inf", None])
def test_bad_durations_are_none(raw: str | None) -> None:
    assert parse_duration(raw) is None


def test_report_reads_every_header_case_insensitively() -> None:
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "29900",
        "x-ratelimit-reset-tokens": "1m0s",
        "retry-after-ms": "250",
    }
    report = read_report(headers)
    assert report == RateReport(
        limit_requests=500,
        remaining_requests=499,
        reset_requests=0.12,
        limit_tokens=30000,
        remaining_tokens=29900,
        reset_tokens=60.0,
        retry_after=0.25,
    )
    assert read_report({}).empty
    assert read_report({"x-ratelimit-remaining-requests": "lots"}).empty


def test_token_estimate_counts_prompt_overhead_and_completion_allowance() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}
    assert estimate_tokens(body) == 3 + 4 + 10
    assert estimate_tokens({**body, "max_tokens": 100}) == 117
    assert estimate_tokens({**body, "max_completion_tokens": 50, "n": 2}) == 117
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert estimate_tokens({"messages": [{"role": "user", "content": parts}]}) == 3 + 4 + 1 + 85
    assert estimate_tokens({}) == 3


def test_usage_is_read_from_the_answer() -> None:
    assert used_tokens('{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}') == 7
    assert used_tokens('{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == 7
    assert used_tokens('{"choices": []}') is None
    assert used_tokens("[1]") is None
    assert used_tokens(None) is None


def admitted_in_any_window(times: list[float], window: float = WINDOW) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


def test_rpm_ceiling_is_never_exceeded_in_any_window_bursts_included() -> None:
    book = Book(RatePolicy(adaptive=False, per_model={"m": Ceiling(rpm=5)}))
    admitted = []
    now = T0
    while now < T0 + 300:
        if book.admit("m", 1, now) is None:
            admitted.append(now)
        now += 0.37
    assert admitted_in_any_window(admitted) == 5
    # And the ceiling is used: about 5 per 61 s.
    assert len(admitted) >= 5 * (300 // (WINDOW + SLACK))


def test_a_refused_call_is_told_when_it_may_go() -> None:
    book = Book(RatePolicy(adaptive=False, total=Ceiling(rpm=2)))
    assert book.admit("a", 1, T0) is None
    assert book.admit("b", 1, T0 + 1) is None
    until = book.admit("a", 1, T0 + 2)
    assert until is not None and T0 + WINDOW < until <= T0 + WINDOW + SLACK + 0.05
    assert book.blocked(T0 + 2)[GLOBAL] == until
    assert book.admit("a", 1, until) is None


def test_tpm_ceiling_counts_estimates_and_usage_corrects_them() -> None:
    book = Book(RatePolicy(adaptive=False, per_model={"m": Ceiling(tpm=100)}))
    assert book.admit("m", 60, T0) is None
    assert book.admit("m", 60, T0 + 1) is not None
    # The first call used only 10 tokens: room for the second one now.
    book.observe("m", sent_at=T0, estimate=60, report=RateReport(), status=200, used=10, now=T0 + 1)
    assert book.admit("m", 60, T0 + 1) is None
    # A call bigger than the ceiling goes alone, once the window is empty.
    until = book.admit("m", 500, T0 + 2)
    assert until is not None and until >= T0 + 1 + WINDOW
    assert book.admit("m", 500, until) is None


def test_pacing_follows_the_reported_budget_and_its_refill() -> None:
    book = Book(RatePolicy())
    assert book.admit("m", 10, T0) is None  # nothing known yet: no pacing
    report = RateReport(
        limit_requests=40, remaining_requests=2, limit_tokens=100_000, remaining_tokens=90_000
    )
    book.observe("m", sent_at=T0, estimate=10, report=report, status=200, used=10, now=T0 + 0.1)
    assert book.admit("m", 10, T0 + 0.1) is None  # one left beside the reserve of 1
    until = book.admit("m", 10, T0 + 0.2)
    # 40 per minute refill one in 1.5 s.
    assert until == pytest.approx(T0 + 1.6, abs=0.01)
    assert book.blocked(T0 + 0.2) == {"m": until}
    assert book.admit("other", 10, T0 + 0.2) is None  # other models are not held


def test_calls_admitted_after_the_reporting_one_are_not_counted_twice_or_forgotten() -> None:
    report = RateReport(limit_requests=10, remaining_requests=5)
    book = Book(RatePolicy())
    for i in range(5):
        assert book.admit("m", 1, T0 + i * 0.1) is None
    # The answer to the first call says 5 left: the 4 admitted after it are not in that figure,
    # so 1 is left, the reserve.
    book.observe("m", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0 + 0.5)
    assert book.admit("m", 1, T0 + 0.5) is not None
    # The same, told exactly which calls came after it (as the worker does), within one 50 ms step.

    def told_after(later: int) -> Book:
        exact = Book(RatePolicy())
        assert exact.admit("m", 1, T0) is None
        first = exact.admitted("m")
        for _ in range(later):
            assert exact.admit("m", 1, T0) is None
        exact.observe(
            "m", sent_at=T0, estimate=1, report=report, status=200, used=None, now=T0 + 0.01, admitted=first
        )
        return exact

    assert told_after(4).admit("m", 1, T0 + 0.01) is not None
    # One less after it: one may go.
    assert told_after(3).admit("m", 1, T0 + 0.01) is None


def test_a_429_pauses_the_model_for_everybody_until_retry_after() -> None:
    book = Book(RatePolicy())
    book.admit("m", 1, T0)
    book.observe(
        "m", sent_at=T0, estimate=1, report=RateReport(retry_after=2.0), status=429, used=None, now=T0 + 0.1
    )
    assert book.cooling_until("m", T0 + 0.2) == pytest.approx(T0 + 2.1)
    assert book.admit("m", 1, T0 + 1) == pytest.approx(T0 + 2.1)
    assert book.admit("n", 1, T0 + 1) is None
    assert book.admit("m", 1, T0 + 2.2) is None
    # Without Retry-After: the exhausted budget's reset.
    book.observe(
        "m",
        sent_at=T0 + 3,
        estimate=1,
        report=RateReport(remaining_tokens=0, reset_tokens=6.0),
        status=429,
        used=None,
        now=T0 + 3,
    )
    assert book.cooling_until("m", T0 + 3) == pytest.approx(T0 + 9)
    # Used-up quota does not go away by waiting: nothing is paused.
    book.observe(
        "q", sent_at=T0, estimate=1, report=RateReport(), status=429, used=None, now=T0, exhausted=True
    )
    assert book.cooling_until("q", T0) is None


def test_pacing_off_keeps_only_the_ceilings() -> None:
    book = Book(RatePolicy(adaptive=False))
    book.observe(
        "m", sent_at=T0, estimate=1, report=RateReport(retry_after=30), status=429, used=None, now=T0
    )
    assert book.admit("m", 1, T0 + 1) is None
    assert not RatePolicy(adaptive=False).active


def test_state_survives_a_round_trip_and_only_changes_are_dumped() -> None:
    book = Book(RatePolicy(per_model={"m": Ceiling(rpm=1)}))
    book.admit("m", 5, T0)
    dumped = book.dump()
    assert set(dumped) == {"m"} and book.dump() == {}
    again = Book.load(RatePolicy(per_model={"m": Ceiling(rpm=1)}), dumped)
    assert again.admit("m", 5, T0 + 1) is not None
    assert ModelState.from_json(dumped["m"]).log == [[pytest.approx(T0), 1.0, 5.0]]


def test_throttled_seconds_are_counted_once() -> None:
    book = Book(RatePolicy())
    assert book.note_throttled("m", T0 + 5, T0) == 5
    assert book.note_throttled("m", T0 + 5, T0 + 1) == 0
    assert book.note_throttled("m", T0 + 7, T0 + 2) == 2
