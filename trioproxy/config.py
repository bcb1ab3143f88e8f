"""Configuration: frozen data, validated once at start.

Sources (lowest to highest precedence, as they are added): built-in defaults,
then the command line. Every validation error names the field and the value.
"""

from __future__ import annotations

from typing import Any

import attrs

from trioproxy.balance.health_rules import StatusRanges
from trioproxy.balance.target import TargetSpec
from trioproxy.http.parsers import resolve
from trioproxy.upstream.origin import BadUpstreamURL, UpstreamURL


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line for the operator."""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')}: must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')}: must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
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
    # None: no health path configured, so a liveness probe of "/" (any status
    # below 500 passes; see balance/health_rules.py). expect None: the default.
    health_path: str | None = attrs.field(default=None)
    health_expect: StatusRanges | None = None
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

    @health_path.validator
    def _check_health_path(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and not value.startswith("/"):
            raise ConfigError(f"health-path: must start with '/', got {value!r}")

    @max_body_size.validator
    def _check_body(self, attribute: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and value < 0:
            raise ConfigError(f"max-body-size: must be >= 0, got {value!r}")


_TARGET_OPTIONS = ("weight", "max_inflight", "health_path")


def parse_target(text: str) -> TargetSpec:
    """``URL[,weight=N][,max_inflight=N][,health_path=/p]`` → TargetSpec.

    Raises:
        ConfigError: one line naming the value and what is wrong with it.
    """
    url_text, *options = text.split(",")
    try:
        url = UpstreamURL.parse(url_text)
    except BadUpstreamURL as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _TARGET_OPTIONS:
            raise ConfigError(
                f"{text!r}: unknown option {option!r} (use {', '.join(_TARGET_OPTIONS)})"
            )
        if key == "health_path":
            if not value.startswith("/"):
                raise ConfigError(f"{text!r}: health_path must start with '/', got {value!r}")
            values[key] = value
        else:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{text!r}: {key} must be a whole number >= 1, got {value!r}")
            values[key] = int(value)
    return TargetSpec(url=url, **values)  # type: ignore[arg-type]
