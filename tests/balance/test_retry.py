"""Retry decisions per method and body, full-jitter backoff bounds, and the retry budget."""

from __future__ import annotations

import random
import statistics

import pytest

from trioproxy.balance.retry import IDEMPOTENT_METHODS, TIMEOUT, RetryBudget, RetryPolicy

pytestmark = pytest.mark.timeout(10)

IDEMPOTENT = [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"]
NOT_IDEMPOTENT = [b"POST", b"PATCH", b"CONNECT", b"get", b"LOCK"]


# --- what may be retried -----------------------------------------------------------------


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.replay_limit) == (3, 1 << 20)
    assert policy.retry_on_status == {502, 503, 504}
    assert {*IDEMPOTENT, b"TRACE"} == IDEMPOTENT_METHODS


@pytest.mark.parametrize("method", IDEMPOTENT + NOT_IDEMPOTENT)
def test_a_request_the_upstream_never_saw_may_always_be_retried(method: bytes) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.may_retry_before_sent(attempts_made=1)
    assert policy.may_retry_before_sent(attempts_made=2)
    assert not policy.may_retry_before_sent(attempts_made=3)


@pytest.mark.parametrize("method", IDEMPOTENT)
@pytest.mark.parametrize("outcome", [502, 503, 504, TIMEOUT])
def test_idempotent_with_replayable_body_is_retried_after_5xx_or_timeout(
    method: bytes, outcome: int | str
) -> None:
    policy = RetryPolicy()
    assert policy.may_retry_after(method, True, outcome, attempts_made=1)  # type: ignore[arg-type]
    assert not policy.may_retry_after(method, False, outcome, attempts_made=1)  # type: ignore[arg-type]
    assert not policy.may_retry_after(method, True, outcome, attempts_made=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", NOT_IDEMPOTENT)
@pytest.mark.parametrize("outcome", [502, 503, 504, TIMEOUT])
def test_non_idempotent_methods_are_never_retried_once_sent(
    method: bytes, outcome: int | str
) -> None:
    assert not RetryPolicy().may_retry_after(method, True, outcome, attempts_made=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [200, 301, 404, 429, 500, 501, 505])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert not RetryPolicy().may_retry_after(b"GET", True, status, attempts_made=1)


def test_retry_on_status_is_configurable() -> None:
    policy = RetryPolicy(retry_on_status=frozenset({500}))
    assert policy.may_retry_after(b"GET", True, 500, attempts_made=1)
    assert not policy.may_retry_after(b"GET", True, 502, attempts_made=1)
    assert policy.may_retry_after(b"GET", True, TIMEOUT, attempts_made=1)


def test_replayable_body_lengths() -> None:
    policy = RetryPolicy(replay_limit=1024)
    assert policy.replayable(0) and policy.replayable(1024)
    assert not policy.replayable(1025)
    assert not policy.replayable(None)
    assert policy.has_attempts_left(2) and not policy.has_attempts_left(3)


# --- backoff -----------------------------------------------------------------------------


def test_backoff_is_full_jitter_within_the_exponential_ceiling() -> None:
    policy = RetryPolicy(backoff_base=0.025, backoff_factor=2.0, backoff_cap=1.0)
    rng = random.Random(42)
    for attempt, ceiling in enumerate([0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        samples = [policy.backoff(attempt, rng) for _ in range(2000)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Spread over the whole interval, not bunched near its end.
        assert min(samples) < 0.02 * ceiling and max(samples) > 0.98 * ceiling
        assert statistics.fmean(samples) == pytest.approx(ceiling / 2, rel=0.06)


def test_backoff_is_reproducible_and_survives_huge_attempts() -> None:
    policy = RetryPolicy()
    assert policy.backoff(3, random.Random(1)) == policy.backoff(3, random.Random(1))
    assert 0.0 <= policy.backoff(10_000, random.Random(1)) <= policy.backoff_cap
    assert RetryPolicy(backoff_base=0.0).backoff(5, random.Random(1)) == 0.0
    with pytest.raises(ValueError, match="attempt"):
        policy.backoff(-1, random.Random(1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"backoff_base": -0.1},
        {"backoff_factor": 0.5},
        {"backoff_cap": -1.0},
        {"replay_limit": -1},
    ],
)
def test_bad_policy_settings_are_refused(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- budget ------------------------------------------------------------------------------


def spend(budget: RetryBudget, now: float) -> int:
    """Retry for as long as the budget allows; how many it allowed."""
    allowed = 0
    while budget.can_retry(now):
        budget.record_retry(now)
        allowed += 1
        assert allowed < 10_000
    return allowed


def test_a_quiet_proxy_can_still_retry_a_little() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_retries_per_window=3)
    budget.record_request(0.0)
    assert spend(budget, 0.0) == 3


def test_a_burst_of_failures_is_capped_at_the_ratio() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_retries_per_window=3)
    for i in range(1000):
        budget.record_request(i / 1000)
    assert spend(budget, 1.0) == 203  # 20% of 1000, plus the floor of 3
    assert not budget.can_retry(5.0)
    # More traffic earns more retries, 1 per 5 requests.
    for _ in range(10):
        budget.record_request(5.0)
    assert spend(budget, 5.0) == 2


def test_the_window_slides_and_old_counts_drop_out() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_retries_per_window=0)
    for _ in range(100):
        budget.record_request(0.5)
    assert spend(budget, 0.5) == 20
    for _ in range(100):
        budget.record_request(5.5)
    assert spend(budget, 5.5) == 20
    # At 10.0 the bucket of 0.5 (requests and retries) has left the window.
    assert budget.snapshot(9.9) == {"requests": 200, "retries": 40, "allowed": 40.0}
    assert budget.snapshot(10.0) == {"requests": 100, "retries": 20, "allowed": 20.0}
    assert not budget.can_retry(10.0)
    assert budget.snapshot(16.0) == {"requests": 0, "retries": 0, "allowed": 0.0}
    assert budget.snapshot(1000.0)["requests"] == 0


def test_steady_traffic_keeps_constant_memory_and_exact_totals() -> None:
    budget = RetryBudget(ratio=0.1, window=10.0, min_retries_per_window=0, buckets=10)
    now = 0.0
    for _ in range(20_000):  # 100 requests a second for 200 s
        now += 0.01
        budget.record_request(now)
        if budget.can_retry(now):
            budget.record_retry(now)
    snap = budget.snapshot(now)
    assert 900 <= snap["requests"] <= 1000
    assert snap["retries"] <= snap["allowed"]
    assert len(budget._requests) == len(budget._retries) == 10


def test_a_clock_that_steps_back_counts_in_the_newest_bucket() -> None:
    budget = RetryBudget(min_retries_per_window=0)
    budget.record_request(5.0)
    budget.record_request(4.0)
    assert budget.snapshot(5.0)["requests"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"window": 0.0}, {"min_retries_per_window": -1}, {"buckets": 0}],
)
def test_bad_budget_settings_are_refused(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        RetryBudget(**kwargs)  # type: ignore[arg-type]
