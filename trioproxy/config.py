"""Configuration: frozen data, validated once at start.

Sources (lowest to highest precedence, as they are added): built-in defaults,
then the command line. Every validation error names the field and the value.
"""

from __future__ import annotations

from typing import Any

import attrs

from trioproxy.http.parsers import resolve
from trioproxy.upstream.origin import UpstreamURL


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
    upstreams: tuple[UpstreamURL, ...] = ()
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
