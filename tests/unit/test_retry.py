"""What an upstream attempt leads to: the request finishes, or is retried after a bounded backoff."""

from __future__ import annotations

import random

import pytest

from llm_proxy.domain.status import Status
from llm_proxy.upstream.outcome import Outcome
from llm_proxy.worker.retry import Finish, RetryAfter, RetryPolicy, decide, exhausted_by_crashes

POLICY = RetryPolicy(max_retries=3, base_delay=0.5, max_delay=30.0)
"""Four attempts in all, like the default MAX_RETRIES=3."""

RATE_LIMITED = Outcome(
    error={"message": "slow down", "type": "rate_limited", "upstream_status": 429}, retryable=True
)
BAD_REQUEST = Outcome(
    error={"message": "bad model", "type": "upstream_error", "upstream_status": 400}, retryable=False
)


class FixedJitter(random.Random):
    """A source whose ``random()`` is always ``value``: the extremes of the jitter, exactly."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_a_successful_attempt_completes_with_the_upstream_answer() -> None:
    answer = '{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}'
    decision = decide(1, Outcome(response_json=answer), POLICY)
    assert decision == Finish(status=Status.COMPLETED, response_json=answer)
    assert isinstance(decision, Finish) and decision.error is None


def test_success_on_the_last_allowed_attempt_still_completes() -> None:
    decision = decide(POLICY.allowed_attempts, Outcome(response_json="{}"), POLICY)
    assert decision == Finish(status=Status.COMPLETED, response_json="{}")


def test_a_non_retryable_failure_ends_at_once_with_the_attempt_count() -> None:
    decision = decide(1, BAD_REQUEST, POLICY)
    assert decision == Finish(
        status=Status.ERROR,
        error={"message": "bad model", "type": "upstream_error", "upstream_status": 400, "attempts": 1},
    )
    assert "attempts" not in BAD_REQUEST.error  # the outcome itself is left alone


def test_a_non_retryable_failure_after_earlier_retries_counts_them() -> None:
    decision = decide(3, BAD_REQUEST, POLICY)
    assert isinstance(decision, Finish) and decision.status is Status.ERROR
    assert decision.error is not None and decision.error["attempts"] == 3
    assert decision.response_json is None


@pytest.mark.parametrize("attempts", range(1, POLICY.allowed_attempts))
@pytest.mark.parametrize("seed", range(20))
def test_a_retryable_failure_before_the_last_attempt_backs_off(attempts: int, seed: int) -> None:
    decision = decide(attempts, RATE_LIMITED, POLICY, random.Random(seed))
    assert isinstance(decision, RetryAfter)
    full = min(POLICY.base_delay * 2 ** (attempts - 1), POLICY.max_delay)
    assert 0.75 * full <= decision.delay <= full


def test_backoff_doubles_and_jitter_takes_off_at_most_a_quarter() -> None:
    no_jitter, most_jitter = FixedJitter(0.0), FixedJitter(0.999999)
    delays = [decide(n, RATE_LIMITED, POLICY, no_jitter) for n in (1, 2, 3)]
    assert delays == [RetryAfter(0.5), RetryAfter(1.0), RetryAfter(2.0)]
    shortest = decide(3, RATE_LIMITED, POLICY, most_jitter)
    assert isinstance(shortest, RetryAfter)
    assert shortest.delay == pytest.approx(1.5, abs=1e-5)


def test_backoff_is_capped_at_the_max_delay() -> None:
    policy = RetryPolicy(max_retries=10, base_delay=0.5, max_delay=3.0)
    for attempts in range(4, 11):
        decision = decide(attempts, RATE_LIMITED, policy, FixedJitter(0.0))
        assert decision == RetryAfter(3.0)
        jittered = decide(attempts, RATE_LIMITED, policy, random.Random(attempts))
        assert isinstance(jittered, RetryAfter) and 2.25 <= jittered.delay <= 3.0


@pytest.mark.parametrize("retry_after", [0.0, 0.25, 7.5, 45.0, 60.0])
def test_an_upstream_retry_after_up_to_60_s_is_waited_exactly(retry_after: float) -> None:
    outcome = Outcome(
        error={"message": "busy", "type": "rate_limited"}, retryable=True, retry_after=retry_after
    )
    # Above max_delay too: the upstream's own hint wins over our cap while it is at most 60 s.
    assert decide(1, outcome, POLICY, random.Random(1)) == RetryAfter(retry_after)


def test_an_upstream_retry_after_above_60_s_is_not_waited_in_full() -> None:
    outcome = Outcome(error={"message": "busy", "type": "rate_limited"}, retryable=True, retry_after=3600.0)
    for seed in range(20):
        decision = decide(1, outcome, POLICY, random.Random(seed))
        assert isinstance(decision, RetryAfter)
        # Waits as long as the backoff allows (max_delay here), jittered, not an hour.
        assert 0.75 * POLICY.max_delay <= decision.delay <= POLICY.max_delay


def test_a_retryable_failure_on_the_last_allowed_attempt_ends_as_an_error() -> None:
    decision = decide(POLICY.allowed_attempts, RATE_LIMITED, POLICY, random.Random(0))
    assert decision == Finish(
        status=Status.ERROR,
        error={"message": "slow down", "type": "rate_limited", "upstream_status": 429, "attempts": 4},
    )


def test_without_retries_a_retryable_failure_ends_on_the_first_attempt() -> None:
    policy = RetryPolicy(max_retries=0, base_delay=0.5, max_delay=30.0)
    decision = decide(1, RATE_LIMITED, policy)
    assert isinstance(decision, Finish) and decision.status is Status.ERROR
    assert decision.error is not None and decision.error["attempts"] == 1


def test_a_full_run_of_retryable_failures_makes_exactly_the_allowed_attempts() -> None:
    rand = random.Random(7)
    attempts = 1
    while isinstance(decide(attempts, RATE_LIMITED, POLICY, rand), RetryAfter):
        attempts += 1
    assert attempts == POLICY.allowed_attempts == 4


def test_crashes_before_the_last_allowed_attempt_do_not_end_the_request() -> None:
    for attempts in range(POLICY.allowed_attempts):
        assert exhausted_by_crashes(attempts, POLICY) is None


@pytest.mark.parametrize("attempts", [4, 5, 9])
def test_crashes_on_every_allowed_attempt_end_the_request(attempts: int) -> None:
    decision = exhausted_by_crashes(attempts, POLICY)
    assert decision is not None
    assert decision.status is Status.ERROR and decision.response_json is None
    assert decision.error is not None
    assert decision.error["type"] == "interrupted"
    assert decision.error["attempts"] == attempts
    assert f"interrupted {attempts} time(s)" in decision.error["message"]
