"""The flat record the listener takes until it takes the nested model.

Transitional: ``from_config`` turns a nested :class:`~trioproxy.config.model.Config`
of one plain route over one upstream group (what every command line means) into
the flat record that ``ProxyServer`` reads today.
"""

from __future__ import annotations

from typing import Any

import attrs

from trioproxy.balance.health import HealthSettings
from trioproxy.balance.target import TargetSpec
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import (
    Config,
    RouteSettings,
)
from trioproxy.http.parsers import resolve


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')}: must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')}: must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class FlatConfig:
    upstreams: tuple[TargetSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8080)
    log_level: str = "info"
    demo: bool = False

    # Timeouts, in seconds (RFC-less defaults chosen like nginx's).
    connect_timeout: float = attrs.field(default=5.0, validator=_positive)
    read_timeout: float = attrs.field(default=300.0, validator=_positive)
    header_timeout: float = attrs.field(default=10.0, validator=_positive)
    body_timeout: float = attrs.field(default=60.0, validator=_positive)
    keepalive_timeout: float = attrs.field(default=75.0, validator=_non_negative)
    pool_timeout: float = attrs.field(default=30.0, validator=_positive)
    upstream_idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    grace: float = attrs.field(default=10.0, validator=_non_negative)

    # Limits, in bytes (max_body_size None = unlimited).
    max_header_size: int = attrs.field(default=65536, validator=_positive)
    max_body_size: int | None = attrs.field(default=None)
    max_connections_per_upstream: int = attrs.field(default=256, validator=_positive)

    #: Parser behind the seam: auto (httptools if importable), h11 or httptools.
    http: str = attrs.field(default="auto")
    preserve_host: bool = False
    upstream_ca: str | None = None
    insecure: bool = False

    # WebSocket tunnels: largest message (else close 1009); idle timeout, 0 = none.
    ws_max_message_size: int = attrs.field(default=16 << 20, validator=_positive)
    ws_idle_timeout: float = attrs.field(default=0.0, validator=_non_negative)

    # Balancing (strategy name, or package.module:Name for a custom one).
    strategy: str = "round_robin"
    # Active health checks.
    health_check: bool = True
    health_method: str = "HEAD"
    health_path: str = "/"
    health_interval: float = attrs.field(default=5.0, validator=_positive)
    health_timeout: float = attrs.field(default=2.0, validator=_positive)
    health_rise: int = attrs.field(default=2, validator=_positive)
    health_fall: int = attrs.field(default=3, validator=_positive)
    # Passive health: consecutive failures of live traffic that eject a target.
    eject_after: int = attrs.field(default=3, validator=_non_negative)
    eject_for: float = attrs.field(default=10.0, validator=_non_negative)
    # Circuit breaker per target.
    breaker_failures: int = attrs.field(default=5, validator=_non_negative)
    breaker_window: float = attrs.field(default=10.0, validator=_positive)
    breaker_open_for: float = attrs.field(default=30.0, validator=_positive)
    breaker_half_open: int = attrs.field(default=3, validator=_positive)
    breaker_successes: int = attrs.field(default=2, validator=_positive)
    # Retries.
    retries: int = attrs.field(default=2, validator=_non_negative)
    retry_budget: float = attrs.field(default=0.2, validator=_non_negative)
    retry_replay_limit: int = attrs.field(default=1 << 20, validator=_non_negative)
    # Admin listener (off unless admin_port is set).
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None

    @port.validator
    def _check_port(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 65535:
            raise ConfigError(f"port: must be 0..65535, got {value!r}")

    @http.validator
    def _check_http(self, attribute: attrs.Attribute[str], value: str) -> None:
        try:
            resolve(value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @max_body_size.validator
    def _check_body(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and value < 0:
            raise ConfigError(f"max-body-size: must be >= 0, got {value!r}")


def from_config(config: Config) -> FlatConfig:
    """The flat record the listener takes today, for a config it can serve as it is:
    one route over one upstream group, with no match, rewrite, headers, CORS,
    direct answer, transform or per-route limit.

    Raises:
        ConfigError: a line per route or key the listener cannot serve yet.
    """
    problems = []
    if len(config.upstreams) != 1 or len(config.routes) != 1:
        problems.append(
            f"trioproxy: this version serves one route over one upstream group; "
            f"the config has {len(config.routes)} routes and {len(config.upstreams)} groups"
        )
    if config.server.headers:
        problems.append("trioproxy: server.headers: not served by this version yet")
    for route in config.routes:
        plain = RouteSettings(name=route.name, upstream=route.upstream)
        if route != plain:
            problems.append(
                f"trioproxy: routes.{route.name}: only a plain route (upstream, no match, "
                "rewrite, headers, cors, respond, timeouts, limits or transform) is served "
                "by this version yet"
            )
    for group in config.upstreams.values():
        default = HealthSettings()
        if (group.health.expected_min, group.health.expected_max) != (
            default.expected_min,
            default.expected_max,
        ):
            problems.append(
                f"trioproxy: upstreams.{group.name}.health.expect: not served by this version yet"
            )
    if problems:
        raise ConfigError(*problems)
    group = next(iter(config.upstreams.values()))
    server = config.server
    health = group.health
    breaker = group.breaker
    return FlatConfig(
        upstreams=group.servers,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        demo=server.demo,
        connect_timeout=group.timeouts.connect,
        read_timeout=group.timeouts.read,
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        keepalive_timeout=server.keepalive_timeout,
        pool_timeout=group.pool.timeout,
        upstream_idle_timeout=group.pool.idle_timeout,
        grace=server.grace,
        max_header_size=server.max_header_size,
        max_body_size=server.max_body_size,
        max_connections_per_upstream=group.pool.max_connections,
        http=server.http,
        preserve_host=group.preserve_host,
        upstream_ca=group.tls.ca,
        insecure=not group.tls.verify,
        ws_max_message_size=server.ws_max_message_size,
        ws_idle_timeout=server.ws_idle_timeout,
        strategy=group.strategy,
        health_check=health.enabled,
        health_method=health.method.decode("ascii"),
        health_path=health.path,
        health_interval=health.interval,
        health_timeout=health.timeout,
        health_rise=health.rise,
        health_fall=health.fall,
        eject_after=group.passive.eject_after,
        eject_for=group.passive.eject_for,
        breaker_failures=breaker.failure_threshold,
        breaker_window=breaker.window,
        breaker_open_for=breaker.open_for,
        breaker_half_open=breaker.half_open_max,
        breaker_successes=breaker.success_threshold,
        retries=group.retry.attempts,
        retry_budget=group.retry.budget,
        retry_replay_limit=group.retry.replay_limit,
        admin_host=server.admin.host if server.admin else "127.0.0.1",
        admin_port=server.admin.port if server.admin else None,
    )
