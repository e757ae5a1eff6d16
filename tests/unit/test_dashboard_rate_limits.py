"""The overview's rate-limit rows: held back until when, and what the upstream last reported."""

from __future__ import annotations

from llm_proxy.dashboard.views import rate_limit_rows


def test_each_known_model_gets_a_row_with_its_hold_and_its_reported_budget() -> None:
    now = 1_800_000_000.0
    rows = rate_limit_rows(
        {"gpt-4o": now + 30, "*": now + 5, "stale": now - 1},
        {
            "gpt-4o": {"remaining requests": 0, "remaining tokens": 1200},
            "gpt-4o-mini": {"remaining requests": 499},
        },
        now,
    )
    assert rows == [
        {
            "model": "every model",
            "held back until": "2027-01-15 08:00:05 UTC",
            "remaining requests": "not reported",
            "remaining tokens": "not reported",
        },
        {
            "model": "gpt-4o",
            "held back until": "2027-01-15 08:00:30 UTC",
            "remaining requests": "0",
            "remaining tokens": "1200",
        },
        {
            "model": "gpt-4o-mini",
            "held back until": "not held back",
            "remaining requests": "499",
            "remaining tokens": "not reported",
        },
        {
            "model": "stale",
            "held back until": "not held back",
            "remaining requests": "not reported",
            "remaining tokens": "not reported",
        },
    ]


def test_nothing_known_shows_no_rows() -> None:
    assert rate_limit_rows({}, {}, 0.0) == []
