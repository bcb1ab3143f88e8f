"""Every transition of the circuit breaker, driven by a fake clock (plain floats)."""

from __future__ import annotations

import pytest

from trioproxy.balance.breaker import BreakerState, BreakerStateError, CircuitBreaker

pytestmark = pytest.mark.timeout(10)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Recorder:
    def __init__(self) -> None:
        self.moves: list[tuple[BreakerState, BreakerState]] = []

    def __call__(self, old: BreakerState, new: BreakerState) -> None:
        self.moves.append((old, new))


def make(**kwargs: float) -> tuple[CircuitBreaker, Recorder]:
    recorder = Recorder()
    return CircuitBreaker(**kwargs, on_transition=recorder), recorder  # type: ignore[arg-type]


def fail(breaker: CircuitBreaker, *times: float) -> None:
    for now in times:
        assert breaker.allow(now)
        breaker.on_failure(now)


def opened(now: float = 0.0, **kwargs: float) -> tuple[CircuitBreaker, Recorder]:
    breaker, recorder = make(**kwargs)
    fail(breaker, *[now] * breaker.failure_threshold)
    assert breaker.state is OPEN
    return breaker, recorder


def half_open(now: float = 30.0, **kwargs: float) -> tuple[CircuitBreaker, Recorder]:
    breaker, recorder = opened(**kwargs)
    assert breaker.allow(now)
    assert breaker.state is HALF_OPEN
    return breaker, recorder


# --- closed ----------------------------------------------------------------------------


def test_closed_allows_and_opens_after_threshold_failures_in_window() -> None:
    breaker, recorder = make()
    assert breaker.state is CLOSED
    fail(breaker, 0.0, 1.0, 2.0, 3.0)
    assert breaker.state is CLOSED and breaker.allow(3.5)
    fail(breaker, 9.0)
    assert breaker.state is OPEN
    assert recorder.moves == [(CLOSED, OPEN)]


def test_successes_do_not_keep_a_closed_breaker_from_counting_failures() -> None:
    breaker, _ = make(failure_threshold=3)
    for now in (0.0, 1.0, 2.0):
        breaker.on_failure(now)
        breaker.on_success(now + 0.5)
    assert breaker.state is OPEN


def test_failures_older_than_the_window_do_not_count() -> None:
    breaker, recorder = make(failure_threshold=5, window=10.0)
    fail(breaker, 0.0, 3.0, 6.0, 9.0, 12.0)  # 12 - 0 >= 10: the first has expired
    assert breaker.state is CLOSED
    assert breaker.failures_in_window(12.0) == 4
    fail(breaker, 13.0)  # 3.0 .. 13.0 spans exactly 10 s: 3.0 has just expired
    assert breaker.state is CLOSED
    fail(breaker, 14.0)  # 6, 9, 12, 13, 14
    assert breaker.state is OPEN
    assert recorder.moves == [(CLOSED, OPEN)]


def test_failures_in_window_expire_with_time() -> None:
    breaker, _ = make(window=10.0)
    fail(breaker, 0.0, 5.0)
    assert breaker.failures_in_window(5.0) == 2
    assert breaker.failures_in_window(12.0) == 1
    assert breaker.failures_in_window(20.0) == 0
    assert breaker.snapshot(12.0)["failures"] == 1


# --- open ------------------------------------------------------------------------------


def test_open_refuses_until_open_for_has_passed_then_goes_half_open() -> None:
    breaker, recorder = opened(now=100.0, open_for=30.0)
    for now in (100.0, 110.0, 129.99):
        assert not breaker.can_allow(now)
        assert not breaker.allow(now)
    assert breaker.state is OPEN
    assert breaker.can_allow(130.0)
    assert breaker.state is OPEN  # can_allow changes nothing
    assert breaker.allow(130.0)
    assert breaker.state is HALF_OPEN
    assert recorder.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_late_outcomes_while_open_are_ignored() -> None:
    breaker, recorder = opened(now=0.0, open_for=30.0)
    breaker.on_failure(20.0)  # a request admitted before it opened
    breaker.on_success(21.0)
    breaker.on_release(22.0)
    assert breaker.state is OPEN
    assert breaker.allow(30.0)  # the open period was not extended
    assert recorder.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


# --- half-open -------------------------------------------------------------------------


def test_half_open_admits_at_most_half_open_max_trials() -> None:
    breaker, _ = half_open(now=30.0, half_open_max=3)  # the first trial is admitted
    assert breaker.allow(30.1) and breaker.allow(30.2)
    assert not breaker.can_allow(30.3)
    assert not breaker.allow(30.3)
    assert breaker.snapshot(30.3)["half_open_trials"] == 3
    breaker.on_success(30.4)  # a verdict frees a slot
    assert breaker.state is HALF_OPEN
    assert breaker.can_allow(30.5) and breaker.allow(30.5)
    assert not breaker.allow(30.6)


def test_success_threshold_successes_close_it() -> None:
    breaker, recorder = half_open(success_threshold=2)
    assert breaker.allow(30.0)
    breaker.on_success(30.5)
    assert breaker.state is HALF_OPEN
    breaker.on_success(31.0)
    assert breaker.state is CLOSED
    assert recorder.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Closed afresh: the failures that opened it no longer count.
    assert breaker.failures_in_window(31.0) == 0
    fail(breaker, 31.0, 31.0, 31.0, 31.0)
    assert breaker.state is CLOSED


def test_any_failure_in_half_open_reopens_for_another_open_for() -> None:
    breaker, recorder = half_open(now=30.0, open_for=30.0)
    breaker.on_success(30.5)
    assert breaker.allow(31.0)
    breaker.on_failure(32.0)
    assert breaker.state is OPEN
    assert not breaker.allow(61.0)  # 30 s from the re-opening, not from the first opening
    assert breaker.allow(62.0)
    assert breaker.state is HALF_OPEN
    assert recorder.moves == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
    ]
    assert breaker.snapshot(62.0)["opens"] == 2


def test_a_new_half_open_period_starts_its_count_afresh() -> None:
    breaker, _ = half_open(now=30.0, success_threshold=2)
    breaker.on_success(30.5)
    assert breaker.allow(30.5)
    breaker.on_failure(31.0)  # re-opens: the one success is forgotten
    assert breaker.allow(61.0)
    breaker.on_success(61.5)
    assert breaker.state is HALF_OPEN


def test_release_frees_a_trial_slot_without_a_verdict() -> None:
    breaker, _ = half_open(half_open_max=1)
    assert not breaker.allow(30.1)
    breaker.on_release(30.2)
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["half_open_successes"] == 0
    assert breaker.allow(30.3)


def test_lost_trials_are_freed_after_open_for_without_a_verdict() -> None:
    breaker, _ = half_open(now=30.0, half_open_max=1, open_for=30.0)
    assert not breaker.can_allow(59.9) and not breaker.allow(59.9)
    assert breaker.can_allow(60.0)
    assert breaker.allow(60.0)
    assert not breaker.allow(60.1)


# --- the table, callbacks, snapshot, settings ------------------------------------------


def test_illegal_moves_raise_an_error_naming_the_states() -> None:
    breaker, recorder = make()
    with pytest.raises(BreakerStateError, match="from closed to half_open") as info:
        breaker._move(HALF_OPEN, 0.0)
    assert info.value.state is CLOSED and info.value.to is HALF_OPEN
    with pytest.raises(BreakerStateError, match="from closed to closed"):
        breaker._move(CLOSED, 0.0)
    breaker, recorder = opened()
    with pytest.raises(BreakerStateError, match="from open to closed"):
        breaker._move(CLOSED, 1.0)
    assert breaker.state is OPEN
    assert recorder.moves == [(CLOSED, OPEN)]


def test_without_a_callback_transitions_still_happen() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for=1.0, success_threshold=1)
    breaker.on_failure(0.0)
    assert breaker.allow(1.0)
    breaker.on_success(1.1)
    assert breaker.state is CLOSED


def test_snapshot_is_json_ready() -> None:
    breaker, _ = make()
    assert breaker.snapshot(0.0) == {
        "state": "closed",
        "failures": 0,
        "failure_threshold": 5,
        "opened_at": None,
        "retry_in": None,
        "half_open_trials": 0,
        "half_open_successes": 0,
        "opens": 0,
    }
    breaker, _ = opened(now=10.0, open_for=30.0)
    snap = breaker.snapshot(25.0)
    assert (snap["state"], snap["opened_at"], snap["retry_in"], snap["opens"]) == (
        "open",
        10.0,
        15.0,
        1,
    )
    assert breaker.snapshot(45.0)["retry_in"] == 0.0
    assert half_open()[0].snapshot()["state"] == "half_open"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window": 0.0}, "window"),
        ({"open_for": -1.0}, "open_for"),
        ({"half_open_max": 0}, "half_open_max"),
        ({"success_threshold": 0}, "success_threshold"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
