"""A circuit breaker per target: stop sending to a target that keeps failing.

The states are Hystrix's (``CLOSED``, ``OPEN``, ``HALF_OPEN``; Nygard, *Release
It!*, ch. 5), with Envoy- and resilience4j-style counted trials in half-open.
Sans-I/O: the caller passes ``now`` (seconds, monotonic) to every method and
reports each admitted request's outcome; nothing here sleeps or reads a clock.

Transition table (every state change goes through :meth:`CircuitBreaker._move`,
which refuses any move not listed here with :class:`BreakerStateError`)::

    from       to          when
    CLOSED     OPEN        on_failure: failure_threshold failures within the last `window` s
    OPEN       HALF_OPEN   allow: `open_for` s have passed since it opened
    HALF_OPEN  CLOSED      on_success: success_threshold trial successes
    HALF_OPEN  OPEN        on_failure: any trial failure (open for another `open_for` s)

What each call does in each state::

                  CLOSED                 OPEN                       HALF_OPEN
    allow         True                   False; after open_for,     True while fewer than
                                         move to HALF_OPEN and      half_open_max trials are
                                         answer as HALF_OPEN        in flight, else False
    on_success    nothing                nothing (a late answer)    one trial done, one success
    on_failure    count it in window     nothing (a late answer)    re-open
    on_release    nothing                nothing                    one trial done, no verdict
    can_allow     True                   what allow would answer, changing nothing

Notes on the rules:

- Failures are counted by time, not in a row: successes in between do not reset
  the count (the passive health check, ``Target.consecutive_failures``, is the
  "in a row" rule). A failure counts while ``now - t < window``. Only the last
  ``failure_threshold`` failure times are kept: the breaker trips when the
  oldest of them is still inside the window.
- Half-open admits at most ``half_open_max`` trials *in flight*; each verdict
  frees its slot. A caller must report every admitted request exactly once —
  ``on_success``, ``on_failure``, or ``on_release`` when it ended without a
  verdict (cancelled, the client went away). Should trials still go missing,
  the slots are freed after ``open_for`` seconds without any verdict, so a
  breaker is never stuck half-open.
- Outcomes that arrive while OPEN come from requests admitted before it opened;
  they are ignored and do not extend the open period. In HALF_OPEN such a late
  outcome cannot be told from a trial's and counts as one.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Final

import attrs

__all__ = ["BreakerState", "BreakerStateError", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerStateError(RuntimeError):
    """A move the transition table does not allow (a bug in the caller or here)."""

    def __init__(self, state: BreakerState, to: BreakerState) -> None:
        super().__init__(f"circuit breaker cannot move from {state.value} to {to.value}")
        self.state = state
        self.to = to


_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN

_TRANSITIONS: Final[dict[BreakerState, frozenset[BreakerState]]] = {
    _CLOSED: frozenset({_OPEN}),
    _OPEN: frozenset({_HALF_OPEN}),
    _HALF_OPEN: frozenset({_CLOSED, _OPEN}),
}


@attrs.define
class CircuitBreaker:
    """One target's breaker; see the module docstring for the rules.

    Args:
        failure_threshold: failures within ``window`` that open it.
        window: seconds a failure keeps counting.
        open_for: seconds it stays open before trying again.
        half_open_max: trials admitted at once while half-open.
        success_threshold: trial successes that close it.
        on_transition: called with ``(old, new)`` after every state change
            (the balancer logs them).
    """

    failure_threshold: int = 5
    window: float = 10.0
    open_for: float = 30.0
    half_open_max: int = 3
    success_threshold: int = 2
    on_transition: Callable[[BreakerState, BreakerState], None] | None = attrs.field(
        default=None, kw_only=True
    )

    _state: BreakerState = attrs.field(default=_CLOSED, init=False)
    _failures: deque[float] = attrs.field(init=False, factory=deque)
    #: When it last opened (None while it never has).
    _opened_at: float | None = attrs.field(default=None, init=False)
    _trials_in_flight: int = attrs.field(default=0, init=False)
    _trial_successes: int = attrs.field(default=0, init=False)
    #: Last time a half-open trial was admitted or reported, for freeing lost trials.
    _trial_activity_at: float = attrs.field(default=0.0, init=False)
    #: How many times it has opened, for /status.
    _opens: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        for name, value, minimum in (
            ("failure_threshold", self.failure_threshold, 1),
            ("half_open_max", self.half_open_max, 1),
            ("success_threshold", self.success_threshold, 1),
            ("open_for", self.open_for, 0),
        ):
            if not value >= minimum:
                raise ValueError(
                    f"circuit breaker: {name} must be at least {minimum}, got {value!r}"
                )
        if not self.window > 0:
            raise ValueError(f"circuit breaker: window must be positive, got {self.window!r}")
        self._failures = deque(maxlen=self.failure_threshold)

    @property
    def state(self) -> BreakerState:
        return self._state

    def can_allow(self, now: float) -> bool:
        """What :meth:`allow` would answer now, without admitting anything or moving.

        The balancer filters candidates with this, then calls :meth:`allow` on
        the one the strategy picked.
        """
        if self._state is _CLOSED:
            return True
        if self._state is _OPEN:
            return self._open_period_over(now)
        return self._trials_in_flight < self.half_open_max or self._trials_lost(now)

    def allow(self, now: float) -> bool:
        """May a request go to this target now? If True, report its outcome later.

        Half-open, a True answer takes one of the ``half_open_max`` trial slots,
        which the outcome (:meth:`on_success`, :meth:`on_failure`,
        :meth:`on_release`) gives back.
        """
        if self._state is _CLOSED:
            return True
        if self._state is _OPEN:
            if not self._open_period_over(now):
                return False
            self._move(_HALF_OPEN, now)
        if self._trials_lost(now):
            self._trials_in_flight = 0
        if self._trials_in_flight >= self.half_open_max:
            return False
        self._trials_in_flight += 1
        self._trial_activity_at = now
        return True

    def on_success(self, now: float) -> None:
        """An admitted request succeeded."""
        if self._state is _HALF_OPEN:
            self._end_trial(now)
            self._trial_successes += 1
            if self._trial_successes >= self.success_threshold:
                self._move(_CLOSED, now)

    def on_failure(self, now: float) -> None:
        """An admitted request failed (as the caller defines failure)."""
        if self._state is _CLOSED:
            failures = self._failures
            failures.append(now)
            if len(failures) == self.failure_threshold and now - failures[0] < self.window:
                self._move(_OPEN, now)
        elif self._state is _HALF_OPEN:
            self._end_trial(now)
            self._move(_OPEN, now)

    def on_release(self, now: float) -> None:
        """An admitted request ended without a verdict (cancelled, client gone)."""
        if self._state is _HALF_OPEN:
            self._end_trial(now)

    def probe_succeeded(self, now: float) -> None:
        """An active health check says the target is back: an open circuit moves to
        half-open at once, so trial requests confirm it without waiting ``open_for``."""
        if self._state is _OPEN:
            self._move(_HALF_OPEN, now)

    def failures_in_window(self, now: float) -> int:
        """Failures that still count towards opening (0 unless closed)."""
        if self._state is not _CLOSED:
            return 0
        return sum(1 for t in self._failures if now - t < self.window)

    def snapshot(self, now: float | None = None) -> dict[str, str | int | float | None]:
        """A JSON-ready view for ``/status``.

        With ``now``, ``failures`` leaves out those that have left the window and
        ``retry_in`` says how long an open breaker stays open.
        """
        failures = (
            self.failures_in_window(now)
            if now is not None
            else (len(self._failures) if self._state is _CLOSED else 0)
        )
        retry_in: float | None = None
        if self._state is _OPEN and now is not None and self._opened_at is not None:
            retry_in = max(0.0, self._opened_at + self.open_for - now)
        return {
            "state": self._state.value,
            "failures": failures,
            "failure_threshold": self.failure_threshold,
            "opened_at": self._opened_at,
            "retry_in": retry_in,
            "half_open_trials": self._trials_in_flight,
            "half_open_successes": self._trial_successes,
            "opens": self._opens,
        }

    def _open_period_over(self, now: float) -> bool:
        assert self._opened_at is not None
        return now - self._opened_at >= self.open_for

    def _trials_lost(self, now: float) -> bool:
        """Trials are in flight but none was admitted or reported for ``open_for`` s."""
        return self._trials_in_flight > 0 and now - self._trial_activity_at >= self.open_for

    def _end_trial(self, now: float) -> None:
        self._trials_in_flight = max(0, self._trials_in_flight - 1)
        self._trial_activity_at = now

    def _move(self, to: BreakerState, now: float) -> None:
        """The one place the state changes, checked against the table."""
        old = self._state
        if to not in _TRANSITIONS[old]:
            raise BreakerStateError(old, to)
        self._state = to
        if to is _OPEN:
            self._opened_at = now
            self._opens += 1
        elif to is _HALF_OPEN:
            self._trials_in_flight = 0
            self._trial_successes = 0
            self._trial_activity_at = now
        else:  # CLOSED: start counting afresh
            self._failures.clear()
            self._trials_in_flight = 0
            self._trial_successes = 0
        if self.on_transition is not None:
            self.on_transition(old, to)
