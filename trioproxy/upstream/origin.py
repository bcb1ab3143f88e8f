"""Where an upstream lives: parsed once from its URL, at configuration time."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

_DEFAULT_PORTS = {"http": 80, "https": 443}


class BadUpstreamURL(ValueError):
    """An upstream URL the proxy cannot use; the message names the value and why."""


@attrs.frozen(slots=True)
class Origin:
    """scheme://host:port — the key of a connection pool."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    #: The ``Host`` value for this origin (RFC 9110 §7.2): port omitted when
    #: default. Made once: it goes into every request.
    host_header: bytes = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != _DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        object.__setattr__(self, "host_header", host.encode("ascii"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header.decode('ascii')}"


@attrs.frozen(slots=True)
class UpstreamURL:
    """An upstream as configured: its origin and an optional path prefix.

    The prefix (the URL's path without its trailing slash) is put in front of
    the client's request-target, which is otherwise forwarded byte for byte.
    """

    origin: Origin
    path_prefix: bytes
    text: str

    @classmethod
    def parse(cls, text: str) -> UpstreamURL:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise BadUpstreamURL(f"{text!r}: {exc}") from None
        if parts.scheme not in _DEFAULT_PORTS:
            raise BadUpstreamURL(f"{text!r}: scheme must be http or https")
        if not parts.hostname:
            raise BadUpstreamURL(f"{text!r}: no host")
        if parts.query or parts.fragment:
            raise BadUpstreamURL(f"{text!r}: a query or fragment is not allowed")
        if parts.username or parts.password:
            raise BadUpstreamURL(f"{text!r}: credentials in the URL are not supported")
        try:
            host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadUpstreamURL(f"{text!r}: invalid host name") from None
        try:
            prefix = parts.path.rstrip("/").encode("ascii")
        except UnicodeError:
            raise BadUpstreamURL(f"{text!r}: the path must be ASCII (percent-encode it)") from None
        if port == 0:
            raise BadUpstreamURL(f"{text!r}: port 0 is not a port one can connect to")
        origin = Origin(parts.scheme, host, _DEFAULT_PORTS[parts.scheme] if port is None else port)
        return cls(origin, prefix, text)

    def upstream_target(self, target: bytes) -> bytes:
        if not self.path_prefix or target == b"*":
            return target
        return self.path_prefix + target
