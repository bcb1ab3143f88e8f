"""An upstream group at run time: one ``[upstreams.NAME]`` table made live.

A :class:`LiveGroup` holds what the proxy knows and keeps about a named group
of servers: its balancer (targets, breakers, strategy state), its connection
pool, its health service, its retry budget. Routes point at it; the engine
starts its prober and closes its pool. A reload that leaves a group's settings
as they were carries the same object into the new snapshot, so that nothing
of what it learned is lost (see ``trioproxy.snapshot``).
"""

from __future__ import annotations

import ssl

import attrs
import trio

from trioproxy.balance.balancer import Balancer
from trioproxy.balance.health import HealthService
from trioproxy.balance.retry import RetryBudget, RetryPolicy
from trioproxy.balance.strategies import make_strategy
from trioproxy.balance.target import Target
from trioproxy.config.model import UpstreamGroup, UpstreamTLS
from trioproxy.http.parsers import client_factory
from trioproxy.upstream.pool import UpstreamPool


def make_ssl_context(tls: UpstreamTLS) -> ssl.SSLContext:
    """Client-side TLS for https upstreams: verification on unless ``verify`` is off,
    and a client certificate when ``cert`` and ``key`` are given."""
    context = ssl.create_default_context(cafile=tls.ca)
    if tls.cert is not None and tls.key is not None:
        # mTLS: presented to upstreams that ask for a client certificate.
        context.load_cert_chain(tls.cert, tls.key)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


@attrs.define(eq=False)
class LiveGroup:
    """A group's settings and its live state.

    ``exchanges`` counts the exchanges (and tunnels) under way on it, between
    ``enter`` and ``leave``: a group a reload removed (``retire``) stops probing
    at once and closes its pool when the last of them ends.
    """

    settings: UpstreamGroup
    balancer: Balancer
    pool: UpstreamPool
    health: HealthService
    retry: RetryPolicy
    budget: RetryBudget
    exchanges: int = 0
    retired: bool = False
    #: Set once retired and without exchanges.
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Its health probers' scope (cancelled on retire).
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def enter(self) -> None:
        self.exchanges += 1

    def leave(self) -> None:
        self.exchanges -= 1
        if self.retired and not self.exchanges:
            self.done.set()

    def retire(self) -> None:
        """No new exchange will come: stop probing; ``done`` when the last one ends."""
        self.retired = True
        self.scope.cancel()
        if not self.exchanges:
            self.done.set()

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def read_timeout(self) -> float:
        return self.settings.timeouts.read

    @property
    def preserve_host(self) -> bool:
        return self.settings.preserve_host

    @classmethod
    def build(
        cls, settings: UpstreamGroup, *, http: str = "auto", max_head_size: int = 65536
    ) -> LiveGroup:
        """A group with fresh state (no connection is opened here).

        Args:
            http: the parser seam implementation (``[server] http``).
            max_head_size: the largest response head accepted from its servers.
        """
        needs_tls = any(spec.url.origin.tls for spec in settings.servers)
        pool = UpstreamPool(
            connect_timeout=settings.timeouts.connect,
            pool_timeout=settings.pool.timeout,
            idle_timeout=settings.pool.idle_timeout,
            max_per_origin=settings.pool.max_connections,
            max_head_size=max_head_size,
            ssl_context=make_ssl_context(settings.tls) if needs_tls else None,
            protocol_factory=client_factory(http),
        )
        balancer = Balancer(
            [Target(spec) for spec in settings.servers],
            strategy=make_strategy(settings.strategy),
            eject_after=settings.passive.eject_after,
            eject_for=settings.passive.eject_for,
            breaker_settings=settings.breaker,
        )
        health = HealthService(
            balancer.targets,
            settings.health,
            ssl_context=pool.ssl_context,
            protocol_factory=pool.protocol_factory,
            on_recovered=lambda target: balancer.reinstate(target, trio.current_time()),
            status_hint="set health.path (--health-path, or health_path= per server) and "
            "health.expect (--health-expect) to the statuses it answers",
        )
        return cls(
            settings=settings,
            balancer=balancer,
            pool=pool,
            health=health,
            retry=RetryPolicy(
                max_attempts=settings.retry.attempts + 1,
                replay_limit=settings.retry.replay_limit,
            ),
            budget=RetryBudget(ratio=settings.retry.budget),
        )
