"""CORS for a route (``cors = {...}``), answered by the proxy (sans-I/O).

The rules follow the Fetch standard's CORS protocol
(https://fetch.spec.whatwg.org/#http-cors-protocol) and, where it leaves the
server a choice, Starlette's ``CORSMiddleware``, whose behaviour Python users
know.

Preflight (:func:`is_preflight`: ``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``). The proxy answers it itself; the upstream
never sees it. When the origin, the method and every requested header are
allowed: ``204 No Content`` with ``Access-Control-Allow-Origin``,
``-Allow-Methods``, ``-Allow-Headers``, ``-Max-Age`` and ``-Allow-Credentials``
where set, and ``Vary: Origin``. Otherwise, as Starlette does,
``400 Bad Request`` with a plain-text body naming what was refused
(``Disallowed CORS origin, headers``) and no ``Access-Control-*`` field, so
the browser fails the preflight and the developer sees why in its network tab.

- ``allow_methods = ["*"]`` echoes the requested method; ``allow_headers =
  ["*"]`` echoes the requested headers (with credentials, Fetch reads a ``*``
  answer literally, so echoing is what works in both cases).
- The CORS-safelisted names ``Accept``, ``Accept-Language``,
  ``Content-Language`` and ``Content-Type`` are always allowed and listed, as
  Starlette does: a JSON ``fetch()`` asks for ``content-type`` and nobody
  expects to configure it.
- Methods are compared case-sensitively (RFC 9110 §9.1), header names not.

Actual requests. :meth:`CorsPolicy.response_headers` edits the response the
client gets. The upstream's own ``Access-Control-*`` fields are always
removed: the route's policy replaces them, also for a foreign origin, which
gets none. An allowed origin gets ``Access-Control-Allow-Origin`` (``*`` when
every origin is allowed without credentials, else the origin itself: with
``allow_credentials`` the answer is never ``*``, and ``["*"]`` then echoes any
origin, as Starlette does), ``-Allow-Credentials`` and ``-Expose-Headers``.
``Vary: Origin`` is added whenever the answer depends on the origin (every
policy but "any origin, no credentials"), to requests from foreign origins
and without ``Origin`` too, so a shared cache never serves one origin's
answer to another (Fetch, "CORS protocol and HTTP caches",
https://fetch.spec.whatwg.org/#cors-protocol-and-http-caches).
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from trioproxy.config.errors import ConfigError
from trioproxy.config.model import CorsSpec
from trioproxy.http.headers import has_token
from trioproxy.http.protocol import Headers
from trioproxy.http.syntax import is_token, quoted

__all__ = ["CorsPolicy", "PreflightAnswer", "compile_cors", "is_preflight"]

# Fetch "CORS-safelisted request-header" names, as Starlette always allows them.
_SAFELISTED: Final = ("Accept", "Accept-Language", "Content-Language", "Content-Type")

# What a browser sends as Origin (Fetch "serialization of an origin"): a
# lower-case scheme and host, a port only when it is not the default, no path.
_ORIGIN: Final = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]+)?")
_DEFAULT_PORTS: Final = {"http": ":80", "https": ":443"}


def is_preflight(method: bytes, headers: Headers) -> bool:
    """Tell whether a request is a CORS preflight: ``OPTIONS`` with ``Origin``
    and ``Access-Control-Request-Method`` (Fetch, "HTTP requests")."""
    if method != b"OPTIONS":
        return False
    origin = requested = False
    for name, _ in headers:
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            requested = True
    return origin and requested


@attrs.frozen(slots=True)
class PreflightAnswer:
    """The complete response to a preflight, framing included."""

    status: int
    headers: Headers
    body: bytes = b""


def _list(values: list[bytes]) -> bytes:
    return b", ".join(values)


@attrs.frozen(slots=True)
class CorsPolicy:
    """A compiled ``cors`` table; see the module docstring for the rules."""

    origins: frozenset[bytes]
    any_origin: bool
    credentials: bool
    #: Case-sensitive; empty with any_method.
    methods: frozenset[bytes]
    any_method: bool
    #: Lower-case, safelisted names included; empty with any_header.
    headers: frozenset[bytes]
    any_header: bool
    #: Preflight fields that do not depend on the request.
    allow_methods: bytes
    allow_headers: bytes
    max_age: bytes | None
    expose_headers: bytes

    @property
    def echoes_origin(self) -> bool:
        """The answer names the request's origin, so it varies with it."""
        return self.credentials or not self.any_origin

    def allows_origin(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    def preflight(self, headers: Headers) -> PreflightAnswer:
        """Answer a preflight (:func:`is_preflight` said so) without the upstream."""
        origin = requested_method = requested_headers = None
        for name, value in headers:
            if name == b"origin" and origin is None:
                origin = value
            elif name == b"access-control-request-method" and requested_method is None:
                requested_method = value
            elif name == b"access-control-request-headers":
                requested_headers = (
                    value if requested_headers is None else requested_headers + b"," + value
                )
        refused: list[str] = []
        if origin is None or not self.allows_origin(origin):
            refused.append("origin")
        if requested_method is None or not (self.any_method or requested_method in self.methods):
            refused.append("method")
        asked = [
            name.strip(b" \t")
            for name in (requested_headers or b"").split(b",")
            if name.strip(b" \t")
        ]
        if not self.any_header and any(name.lower() not in self.headers for name in asked):
            refused.append("headers")
        if refused:
            body = ("Disallowed CORS " + ", ".join(refused)).encode()
            return PreflightAnswer(
                status=400,
                headers=[
                    (b"vary", b"Origin"),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"%d" % len(body)),
                ],
                body=body,
            )
        assert origin is not None and requested_method is not None  # refused otherwise
        out: Headers = [
            (b"access-control-allow-origin", origin if self.echoes_origin else b"*"),
            (
                b"access-control-allow-methods",
                requested_method if self.any_method else self.allow_methods,
            ),
        ]
        allow_headers = _list(asked) if self.any_header else self.allow_headers
        if allow_headers:
            out.append((b"access-control-allow-headers", allow_headers))
        if self.max_age is not None:
            out.append((b"access-control-max-age", self.max_age))
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        out.append((b"vary", b"Origin"))
        return PreflightAnswer(status=204, headers=out)

    def response_headers(self, origin: bytes | None, headers: Headers) -> Headers:
        """Return the response fields for the client, with this policy's CORS fields.

        Args:
            origin: the request's ``Origin`` value, or ``None``.
            headers: the response fields about to be sent; not modified.
        """
        out: Headers = [field for field in headers if not field[0].startswith(b"access-control-")]
        if origin is not None and self.allows_origin(origin):
            out.append((b"access-control-allow-origin", origin if self.echoes_origin else b"*"))
            if self.credentials:
                out.append((b"access-control-allow-credentials", b"true"))
            if self.expose_headers:
                out.append((b"access-control-expose-headers", self.expose_headers))
        if self.echoes_origin and not (
            has_token(out, b"vary", b"origin") or has_token(out, b"vary", b"*")
        ):
            out.append((b"vary", b"Origin"))
        return out


def _origin_problem(origin: str) -> str | None:
    if origin == "null":
        return None  # opaque origins (sandboxed frames, file:) send "null"
    if not _ORIGIN.fullmatch(origin):
        if origin != origin.lower() and _ORIGIN.fullmatch(origin.lower()):
            return f"browsers send origins in lower case, got {quoted(origin)}"
        return f"an origin is scheme://host[:port], with no path, got {quoted(origin)}"
    scheme = origin.partition(":")[0]
    default = _DEFAULT_PORTS.get(scheme)
    if default and origin.endswith(default):
        return f"browsers leave the default port out of an origin, got {quoted(origin)}"
    return None


def _names(
    values: tuple[str, ...], where: str, what: str, problems: list[str]
) -> tuple[list[str], bool]:
    if "*" in values:
        if len(values) > 1:
            problems.append(f'{where}: "*" allows every {what}; list no other with it')
        return [], True
    for value in values:
        if not is_token(value):
            problems.append(f"{where}: not a {what}, got {quoted(value)}")
    return [value for value in values if is_token(value)], False


def compile_cors(spec: CorsSpec, key_path: str) -> CorsPolicy:
    """Compile a ``cors`` table.

    Args:
        spec: the table.
        key_path: its key path, e.g. ``routes.users.cors``.

    Raises:
        ConfigError: listing every problem, one per line.
    """
    problems: list[str] = []
    any_origin = "*" in spec.allow_origins
    origins: list[str] = []
    if not spec.allow_origins:
        problems.append(
            f'{key_path}.allow_origins: empty, so no origin is allowed; ["*"] allows every one'
        )
    elif any_origin:
        if len(spec.allow_origins) > 1:
            problems.append(
                f'{key_path}.allow_origins: "*" allows every origin; list no other with it'
            )
    else:
        for origin in spec.allow_origins:
            problem = _origin_problem(origin)
            if problem is None:
                origins.append(origin)
            else:
                problems.append(f"{key_path}.allow_origins: {problem}")
    if not spec.allow_methods:
        problems.append(f"{key_path}.allow_methods: empty, so every preflight would be refused")
    methods, any_method = _names(
        spec.allow_methods, f"{key_path}.allow_methods", "method", problems
    )
    allowed, any_header = _names(
        spec.allow_headers, f"{key_path}.allow_headers", "header name", problems
    )
    exposed, any_exposed = _names(
        spec.expose_headers, f"{key_path}.expose_headers", "header name", problems
    )
    if spec.max_age is not None and spec.max_age < 0:
        problems.append(f"{key_path}.max_age: must be >= 0 seconds, got {spec.max_age}")
    if problems:
        raise ConfigError("\n".join(problems))

    lowered = {name.lower() for name in allowed}
    listed = allowed + [name for name in _SAFELISTED if name.lower() not in lowered]
    return CorsPolicy(
        origins=frozenset(origin.encode() for origin in origins),
        any_origin=any_origin,
        credentials=spec.allow_credentials,
        methods=frozenset(method.encode() for method in methods),
        any_method=any_method,
        headers=frozenset(name.lower().encode() for name in listed),
        any_header=any_header,
        allow_methods=_list([method.encode() for method in methods]),
        allow_headers=_list([name.encode() for name in listed]),
        max_age=None if spec.max_age is None else str(spec.max_age).encode(),
        expose_headers=b"*" if any_exposed else _list([name.encode() for name in exposed]),
    )
