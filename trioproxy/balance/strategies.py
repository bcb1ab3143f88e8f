"""Balancing strategies: plain objects that choose one target from the candidates.

A strategy is anything with ``pick(candidates, request)`` (see :class:`Strategy`).
The balancer hands it the targets that may take the request right now — healthy,
not ejected, breaker not open, under their ``max_inflight`` cap — so the list is
never empty, and it may differ from one call to the next. A strategy never
reads a clock or a socket; randomness comes from an injectable
:class:`random.Random`, so tests seed it and get the same picks every run.

The rules, one per strategy:

``round_robin`` (:class:`RoundRobin`)
    Each candidate in turn: a cursor that advances by one per pick, taken modulo
    the number of candidates of that call.

``random`` (:class:`Random`)
    Uniformly at random.

``weighted`` (:class:`Weighted`)
    nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer`` in
    ``ngx_http_upstream_round_robin.c``): every pick adds each candidate's weight
    to its ``current_weight``, chooses the candidate with the largest
    ``current_weight`` (the first one on a tie) and subtracts the total weight
    of the candidates from the chosen one. Weights 3:2:1 give ``a b a c b a``:
    a 3:2:1 split, spread out rather than in bursts. ``current_weight`` is kept
    per target object, so a target that drops out of the candidates (ejected,
    at its cap) keeps its place and picks up where it left off when it comes
    back, exactly as nginx skips a down peer; the state of a target that is
    gone for good is dropped with the target (weak references).

``least_connections`` (:class:`LeastConnections`)
    The candidate with the fewest ``inflight`` (requests in flight plus open
    WebSocket tunnels). Ties — the usual case at low load, when everything is
    at 0 — are broken round-robin (a cursor over the tied candidates), or at
    random if an ``rng`` is given; never always the first.

``fastest`` (:class:`Fastest`)
    Power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized
    Load Balancing", 2001; Finagle's and Linkerd's P2C balancers): sample two
    distinct candidates at random and take the one with the lower score, where::

        score = max(latency, 100 µs) * (1 + inflight) * decay ** losses

    ``latency`` is the target's EWMA (probes and live traffic); a target not yet
    measured (``latency is None``) wins, so a new target gets measured at once.
    The ``(1 + inflight)`` factor is Finagle's "peak EWMA" cost: a fast target
    that is already busy looks slower. ``losses`` counts how many times in a row
    the target was sampled and *not* chosen; it returns to 0 when the target is
    picked. That decay is what keeps a slow or stale target from starving:
    a target 5x slower than its rival is still chosen after about
    ``log(5) / log(1 / decay)`` lost comparisons (16 at the default 0.9, ~6% of
    the traffic between the two), which measures it again — and if it has
    recovered, its EWMA falls and it wins its share back. Two equal targets
    simply alternate. Decay counts comparisons rather than seconds because
    ``pick`` is given no clock; it also makes the exploration rate a share of
    the traffic, not of time.

A custom strategy, ``package.module:Name``, is loaded by
:func:`trioproxy.balance.custom.load_strategy`; its protocol is documented there.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from trioproxy.balance.custom import load_strategy
from trioproxy.balance.target import Target

if TYPE_CHECKING:
    from trioproxy.http.protocol import RequestHead

T = TypeVar("T")

__all__ = [
    "STRATEGIES",
    "Fastest",
    "LeastConnections",
    "Random",
    "RoundRobin",
    "Strategy",
    "Weighted",
    "make_strategy",
]


class Strategy(Protocol):
    """What the balancer calls to choose a target."""

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        """One of ``candidates``.

        Args:
            candidates: the targets that may take this request; never empty, and
                possibly different on every call.
            request: the request head being routed, for strategies that look at
                it (hashing on a header, say); ``None`` when there is none (a
                health decision, a test).

        Returns:
            One element of ``candidates``, the object itself.
        """
        ...


class RoundRobin:
    """Each candidate in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[T], request: RequestHead | None = None) -> T:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]


class Random:
    """Uniformly at random."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def pick(self, candidates: Sequence[T], request: RequestHead | None = None) -> T:
        return candidates[self._rng.randrange(len(candidates))]


class Weighted:
    """nginx's smooth weighted round-robin; see the module docstring.

    A weight below 1 counts as 1 (configuration validates weights; this keeps
    the arithmetic sound whatever it is given).
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: weakref.WeakKeyDictionary[Target, int] = weakref.WeakKeyDictionary()

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        current = self._current
        total = 0
        best: Target | None = None
        best_weight = 0
        for target in candidates:
            weight = max(1, target.weight)
            total += weight
            value = current.get(target, 0) + weight
            current[target] = value
            if best is None or value > best_weight:
                best, best_weight = target, value
        assert best is not None, "pick() needs at least one candidate"
        current[best] = best_weight - total
        return best


class LeastConnections:
    """Fewest ``inflight``; ties round-robin, or at random with an ``rng``."""

    __slots__ = ("_next", "_rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng
        self._next = 0

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        fewest = min(target.inflight for target in candidates)
        tied = [target for target in candidates if target.inflight == fewest]
        if len(tied) == 1:
            return tied[0]
        if self._rng is not None:
            return tied[self._rng.randrange(len(tied))]
        index = self._next % len(tied)
        self._next = index + 1
        return tied[index]


#: Latencies below this count as this much, so that a 0 s measurement (a coarse
#: or fake clock) does not make its target unbeatable.
_LATENCY_FLOOR = 1e-4


class Fastest:
    """Power of two choices on a latency-and-load score; see the module docstring.

    Args:
        rng: source of the random samples (seed it in tests).
        decay: factor in (0, 1) applied to a target's score for each comparison
            it lost since it was last picked. Closer to 1 favours the fastest
            target more strongly and re-measures slow ones less often.
    """

    __slots__ = ("_decay", "_losses", "_rng")

    def __init__(self, rng: random.Random | None = None, decay: float = 0.9) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"fastest: decay must be between 0 and 1 (exclusive), got {decay!r}")
        self._rng = rng if rng is not None else random.Random()
        self._decay = decay
        self._losses: weakref.WeakKeyDictionary[Target, int] = weakref.WeakKeyDictionary()

    def score(self, target: Target) -> float:
        """The cost compared between the two samples; lower wins, unmeasured is 0."""
        if target.latency is None:
            return 0.0
        penalty = max(target.latency, _LATENCY_FLOOR) * (1 + target.inflight)
        return penalty * self._decay ** self._losses.get(target, 0)

    def pick(self, candidates: Sequence[Target], request: RequestHead | None = None) -> Target:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        # The sample order is random, so a tie going to ``a`` is a fair coin.
        winner, loser = (b, a) if self.score(b) < self.score(a) else (a, b)
        self._losses[winner] = 0
        self._losses[loser] = self._losses.get(loser, 0) + 1
        return winner


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "round_robin": RoundRobin,
    "random": Random,
    "weighted": Weighted,
    "least_connections": LeastConnections,
    "fastest": Fastest,
}


def make_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (``least-connections`` works as well as ``least_connections``).

    A name with a ``:`` is a custom strategy, ``package.module:Name``, loaded by
    :func:`trioproxy.balance.custom.load_strategy`.

    Raises:
        ValueError: ``name`` is not a known strategy, or the custom one cannot be
            loaded; the one-line message names the value and the valid choices.
    """
    if ":" in name:
        return load_strategy(name)
    factory = STRATEGIES.get(name.strip().lower().replace("-", "_"))
    if factory is None:
        valid = ", ".join(STRATEGIES)
        raise ValueError(
            f"unknown balancing strategy {name!r}: expected one of {valid}, "
            "or package.module:Name for a custom one"
        )
    return factory()
