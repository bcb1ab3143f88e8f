"""When a request may go to another target, how long to wait first, and how many may.

Sans-I/O: plain decisions over plain values; time comes in as ``now`` and
randomness as a :class:`random.Random`.

The rules (:class:`RetryPolicy`):

1. **Never after any byte of the response went to the client.** The caller
   enforces this one: once a response head is relayed, the exchange is committed.
2. **The upstream never saw the request** — connecting failed, the breaker was
   open, no pooled connection came free in time: retry, whatever the method.
   Nothing was sent, so nothing can happen twice (:meth:`RetryPolicy.may_retry_before_sent`).
3. **The upstream saw it** and answered 502/503/504 (``retry_on_status``), or did
   not answer in time: retry only when the method is idempotent (RFC 9110
   §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE — sending one twice has the
   effect of sending it once) *and* the body can be sent again, i.e. it was kept
   because it fits in ``replay_limit`` bytes (:meth:`RetryPolicy.may_retry_after`).
   A POST or PATCH that reached an upstream is never retried.
4. At most ``max_attempts`` tries in all (the first one included).
5. Before retry *n* (``attempt = n - 1``, so 0 before the first retry) wait a
   random time drawn by AWS's "full jitter" (Brooker, "Exponential Backoff And
   Jitter", AWS Architecture Blog, 2015)::

       sleep = uniform(0, min(backoff_cap, backoff_base * backoff_factor ** attempt))

   Spreading retries over the whole interval, rather than around its end, is
   what stops clients that failed together from retrying together.
6. Retries are rationed by a :class:`RetryBudget` shared by all requests: at
   most ``ratio`` (20%) of the requests of the last ``window`` seconds may be
   retried, plus ``min_retries_per_window`` so that a quiet proxy can still
   retry at all. A sick cluster then sees at most 1.2x its normal load, not
   ``max_attempts`` x (the design of Finagle's ``RetryBudget`` and of the Google
   SRE book's per-client retry budget, ch. 22).
"""

from __future__ import annotations

import random
from typing import Final, Literal

import attrs

__all__ = ["IDEMPOTENT_METHODS", "TIMEOUT", "RetryBudget", "RetryPolicy"]

#: RFC 9110 §9.2.2. Method names are case-sensitive (§9.1): ``b"get"`` is not GET.
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: ``status_or_timeout`` for "the upstream did not answer in time".
TIMEOUT: Final = "timeout"


def _at_least(owner: str, name: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value!r}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Which failures may be retried, how often, and after how long; see the module docstring."""

    max_attempts: int = 3
    backoff_base: float = 0.025
    backoff_factor: float = 2.0
    backoff_cap: float = 1.0
    replay_limit: int = 1 << 20
    retry_on_status: frozenset[int] = frozenset({502, 503, 504})

    def __attrs_post_init__(self) -> None:
        for name, minimum in (
            ("max_attempts", 1),
            ("backoff_base", 0),
            ("backoff_factor", 1),
            ("backoff_cap", 0),
            ("replay_limit", 0),
        ):
            _at_least("retry policy", name, getattr(self, name), minimum)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``attempt + 1`` (``attempt`` 0 is the first retry).

        Full jitter: uniform over ``[0, min(cap, base * factor ** attempt)]``.

        Raises:
            ValueError: ``attempt`` is negative.
        """
        if attempt < 0:
            raise ValueError(f"retry: backoff attempt must be >= 0, got {attempt!r}")
        try:
            ceiling = min(self.backoff_cap, self.backoff_base * self.backoff_factor**attempt)
        except OverflowError:
            ceiling = self.backoff_cap
        return rng.uniform(0.0, ceiling)

    def replayable(self, body_length: int | None) -> bool:
        """Whether a body of ``body_length`` bytes may be kept for a retry.

        ``None`` is a body of unknown length (chunked): it is replayable only if
        it turns out to fit, which the caller learns while buffering it.
        """
        return body_length is not None and body_length <= self.replay_limit

    def has_attempts_left(self, attempts_made: int) -> bool:
        """Whether ``attempts_made`` tries leave room for another."""
        return attempts_made < self.max_attempts

    def may_retry_before_sent(self, *, attempts_made: int) -> bool:
        """After a failure the upstream never saw (connect error, breaker open, pool timeout).

        Any method: nothing was sent. Only ``max_attempts`` limits it.
        """
        return self.has_attempts_left(attempts_made)

    def may_retry_after(
        self,
        method: bytes,
        body_replayable: bool,
        status_or_timeout: int | Literal["timeout"],
        *,
        attempts_made: int,
    ) -> bool:
        """After the upstream saw the request and answered ``status`` or timed out.

        Args:
            method: the request method, as received.
            body_replayable: the whole body was kept and can be sent again (an
                empty body is replayable).
            status_or_timeout: the response status, or :data:`TIMEOUT` when no
                response head came in time.
            attempts_made: tries so far, this one included.
        """
        if status_or_timeout != TIMEOUT and status_or_timeout not in self.retry_on_status:
            return False
        return (
            method in IDEMPOTENT_METHODS
            and body_replayable
            and self.has_attempts_left(attempts_made)
        )


@attrs.define
class RetryBudget:
    """Retries allowed: ``ratio`` of the requests of the last ``window`` s, plus a floor.

    ``record_request`` once per client request (not per attempt),
    ``can_retry`` before a retry and ``record_retry`` when making one.

    The window slides in ``buckets`` steps: counts live in a ring of buckets
    ``window / buckets`` seconds wide, and running totals are kept, so every
    call is O(1) amortised and memory is fixed whatever the traffic. The window
    is therefore between ``window * (1 - 1/buckets)`` and ``window`` seconds long.
    """

    ratio: float = 0.2
    window: float = 10.0
    min_retries_per_window: int = 3
    buckets: int = 10

    _requests: list[int] = attrs.field(init=False)
    _retries: list[int] = attrs.field(init=False)
    _total_requests: int = attrs.field(default=0, init=False)
    _total_retries: int = attrs.field(default=0, init=False)
    #: Number (``floor(now / width)``) of the newest bucket; None before the first call.
    _current: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        for name, minimum in (("ratio", 0), ("min_retries_per_window", 0), ("buckets", 1)):
            _at_least("retry budget", name, getattr(self, name), minimum)
        if not self.window > 0:
            raise ValueError(f"retry budget: window must be positive, got {self.window!r}")
        self._requests = [0] * self.buckets
        self._retries = [0] * self.buckets

    def record_request(self, now: float) -> None:
        slot = self._advance(now)
        self._requests[slot] += 1
        self._total_requests += 1

    def record_retry(self, now: float) -> None:
        slot = self._advance(now)
        self._retries[slot] += 1
        self._total_retries += 1

    def can_retry(self, now: float) -> bool:
        """Whether one more retry stays within the budget."""
        self._advance(now)
        allowed = self.min_retries_per_window + self.ratio * self._total_requests
        return self._total_retries + 1 <= allowed

    def snapshot(self, now: float) -> dict[str, int | float]:
        """Counts in the window, for ``/status``."""
        self._advance(now)
        return {
            "requests": self._total_requests,
            "retries": self._total_retries,
            "allowed": self.min_retries_per_window + self.ratio * self._total_requests,
        }

    def _advance(self, now: float) -> int:
        """Slide the window to ``now``; the slot of the current bucket."""
        number = int(now // (self.window / self.buckets))
        current = self._current
        if current is None or number - current >= self.buckets:
            self._requests = [0] * self.buckets
            self._retries = [0] * self.buckets
            self._total_requests = self._total_retries = 0
        elif number > current:
            for passed in range(current + 1, number + 1):
                slot = passed % self.buckets
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
        else:
            # Same bucket, or a clock that stepped back: count it in the newest bucket.
            return current % self.buckets
        self._current = number
        return number % self.buckets
