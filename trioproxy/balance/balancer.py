"""The balancer: the live view of the targets and the strategy that picks one.

A target is a *candidate* for a request when all of these hold:

* the active health probers last judged it healthy (``Target.healthy``);
* passive health has not ejected it (``now >= Target.ejected_until``): live
  traffic saw ``eject_after`` consecutive connect errors or 5xx responses, so it
  is left alone for ``eject_for`` seconds before the probers would notice. The
  last available target is never ejected (as nginx ignores ``max_fails`` for a
  lone server): with nowhere else to go, trying it beats a certain 503;
* its circuit breaker admits a request (closed, or half-open with a trial free;
  ``failure_threshold=0`` turns the breakers off);
* it is under its ``max_inflight`` cap (requests plus open tunnels);
* the request did not already try it (``exclude``, for retries).

The strategy chooses among the candidates; with none left the request gets 503
with ``Retry-After``. Sans-I/O: time comes in as ``now``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs

from trioproxy.balance.breaker import BreakerState, CircuitBreaker
from trioproxy.balance.strategies import RoundRobin, Strategy
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.errors import NoHealthyUpstream
from trioproxy.http.protocol import RequestHead
from trioproxy.upstream.origin import UpstreamURL

log = logging.getLogger("trioproxy.balance")


@attrs.frozen(kw_only=True)
class BreakerSettings:
    failure_threshold: int = 5
    window: float = 10.0
    open_for: float = 30.0
    half_open_max: int = 3
    success_threshold: int = 2


@attrs.define
class Balancer:
    targets: list[Target]
    strategy: Strategy = attrs.Factory(RoundRobin)
    eject_after: int = 3
    eject_for: float = 10.0
    breaker_settings: BreakerSettings = attrs.Factory(BreakerSettings)
    _breakers: dict[int, CircuitBreaker] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        for target in self.targets:
            self._add_breaker(target)

    @classmethod
    def of_urls(cls, urls: Sequence[UpstreamURL], **kwargs: object) -> Balancer:
        return cls([Target(TargetSpec(url=url)) for url in urls], **kwargs)  # type: ignore[arg-type]

    def _add_breaker(self, target: Target) -> None:
        settings = self.breaker_settings
        if settings.failure_threshold == 0:
            self._breakers[id(target)] = _NO_BREAKER  # type: ignore[assignment]
            return

        def transition(old: BreakerState, new: BreakerState) -> None:
            log.warning("circuit breaker for %s: %s -> %s", target.name, old.name, new.name)

        self._breakers[id(target)] = CircuitBreaker(
            failure_threshold=settings.failure_threshold,
            window=settings.window,
            open_for=settings.open_for,
            half_open_max=settings.half_open_max,
            success_threshold=settings.success_threshold,
            on_transition=transition,
        )

    def set_targets(self, targets: list[Target]) -> None:
        self.targets = targets
        for target in targets:
            if id(target) not in self._breakers:
                self._add_breaker(target)

    def breaker(self, target: Target) -> CircuitBreaker:
        return self._breakers[id(target)]

    def available(self, target: Target, now: float) -> bool:
        """Whether the target may take a request now, breaker aside."""
        return target.healthy and now >= target.ejected_until and not target.at_capacity()

    def pick(
        self, request: RequestHead | None, *, now: float, exclude: Sequence[Target] = ()
    ) -> Target:
        """A target for the request; its breaker has admitted it.

        Raises:
            NoHealthyUpstream: every target is down, ejected, open, at its cap
                or already tried.
        """
        candidates = [
            t
            for t in self.targets
            if self.available(t, now) and t not in exclude and self._breakers[id(t)].can_allow(now)
        ]
        if not candidates:
            raise NoHealthyUpstream(self._why_none(now, exclude))
        target = self.strategy.pick(candidates, request)
        self._breakers[id(target)].allow(now)
        return target

    def has_candidate(self, now: float, *, exclude: Sequence[Target] = ()) -> bool:
        """Whether ``pick`` would find a target (without admitting one)."""
        return any(
            self.available(t, now) and t not in exclude and self._breakers[id(t)].can_allow(now)
            for t in self.targets
        )

    def _why_none(self, now: float, exclude: Sequence[Target]) -> str:
        if not self.targets:
            return "no upstream configured"
        states = []
        for t in self.targets:
            if t in exclude:
                why = "tried"
            elif not t.healthy:
                why = "unhealthy"
            elif now < t.ejected_until:
                why = "ejected"
            elif t.at_capacity():
                why = "at max_inflight"
            else:
                why = f"breaker {self._breakers[id(t)].state.name.lower()}"
            states.append(f"{t.name} {why}")
        return "no upstream available: " + ", ".join(states)

    @contextmanager
    def track(self, target: Target, *, tunnel: bool = False) -> Iterator[None]:
        """Count a request (or a WebSocket tunnel) in flight on ``target``."""
        target.inflight += 1
        if tunnel:
            target.tunnels += 1
        try:
            yield
        finally:
            target.inflight -= 1
            if tunnel:
                target.tunnels -= 1

    # --- outcomes: breaker and passive health -------------------------------------

    def on_success(self, target: Target, now: float, latency: float | None = None) -> None:
        target.requests += 1
        target.consecutive_failures = 0
        if latency is not None:
            target.record_latency(latency)
        self._breakers[id(target)].on_success(now)

    def on_failure(self, target: Target, now: float) -> None:
        """A connect error, timeout or 5xx from ``target``."""
        target.requests += 1
        target.failures += 1
        target.consecutive_failures += 1
        self._breakers[id(target)].on_failure(now)
        if (
            self.eject_after
            and target.consecutive_failures >= self.eject_after
            and self.has_candidate(now, exclude=(target,))
        ):
            if now >= target.ejected_until:
                log.warning(
                    "ejecting %s for %.1f s after %d consecutive failures",
                    target.name,
                    self.eject_for,
                    target.consecutive_failures,
                )
            target.ejected_until = now + self.eject_for
            target.consecutive_failures = 0

    def reinstate(self, target: Target, now: float) -> None:
        """The probers found ``target`` healthy again: lift a passive ejection and let
        its breaker try it now (as Envoy's successful_active_health_check_uneject_host)."""
        target.ejected_until = 0.0
        target.consecutive_failures = 0
        self._breakers[id(target)].probe_succeeded(now)

    def on_cancelled(self, target: Target, now: float) -> None:
        """The exchange ended for reasons of the client's: no verdict on the target."""
        self._breakers[id(target)].on_release(now)

    def any_healthy(self, now: float) -> bool:
        """Whether some target could take a request now (a breaker past its open
        time counts: it would admit a trial)."""
        return self.has_candidate(now)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Per-target state for the admin /status endpoint."""
        return [
            {
                "url": t.name,
                "weight": t.weight,
                "healthy": t.healthy,
                "ejected": now < t.ejected_until,
                "ejected_for_s": round(max(0.0, t.ejected_until - now), 3),
                "inflight": t.inflight,
                "tunnels": t.tunnels,
                "max_inflight": t.spec.max_inflight,
                "latency_ms": _ms(t.latency),
                "last_latency_ms": _ms(t.last_latency),
                "requests": t.requests,
                "failures": t.failures,
                "breaker": self._breakers[id(t)].snapshot(now),
            }
            for t in self.targets
        ]


class _NoBreaker:
    """Stands in for a CircuitBreaker when breakers are off: always closed."""

    state = BreakerState.CLOSED

    def allow(self, now: float) -> bool:
        return True

    def can_allow(self, now: float) -> bool:
        return True

    def on_success(self, now: float) -> None:
        pass

    def on_failure(self, now: float) -> None:
        pass

    def on_release(self, now: float) -> None:
        pass

    def probe_succeeded(self, now: float) -> None:
        pass

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        return {"state": "disabled"}


_NO_BREAKER = _NoBreaker()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
