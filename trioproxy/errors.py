"""One error hierarchy for the whole proxy.

Every failure the proxy can answer with an HTTP response is a :class:`ProxyError`
carrying the status it becomes and a short, fixed text for the client. Third-party
exceptions (``OSError``, ``h11``, ``ssl``) are mapped to these once, at the I/O
boundary that sees them; nothing above that boundary catches foreign exceptions.

The text that reaches a client is the class's ``reason``: it names the cause and
never contains an exception string, a path or a traceback. ``detail`` is for the
operator's log only.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the proxy turns into a response (or an aborted one)."""

    status: int = 500
    reason: str = "internal proxy error"
    #: Extra response headers that go with the status (e.g. ``Retry-After``).
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


# --- the client's side ---------------------------------------------------------


class ProtocolError(ProxyError):
    """The peer broke HTTP/1.1 framing or syntax.

    Raised by the parser seam for whichever side it parses; ``status`` is the
    hint for a response (400 malformed, 431 head too large, 501 unsupported
    transfer coding), in the manner of h11's ``error_status_hint``.
    """

    status = 400
    reason = "malformed request"

    def __init__(self, detail: str = "", *, status: int = 400, reason: str = "") -> None:
        super().__init__(detail)
        self.status = status
        if reason:
            self.reason = reason
        elif status == 431:
            self.reason = "request header fields too large"
        elif status == 501:
            self.reason = "transfer coding not implemented"


class MethodNotAllowed(ProxyError):
    status = 405
    reason = "method not allowed by this proxy"


class BodyTooLarge(ProxyError):
    status = 413
    reason = "request body too large"


class ClientTimeout(ProxyError):
    status = 408
    reason = "request not received in time"


class BadWebSocketRequest(ProxyError):
    """An upgrade request that is not a valid opening handshake (RFC 6455 §4.2.1)."""

    status = 400
    reason = "invalid WebSocket handshake"


class ClientDisconnected(ProxyError):
    """The client went away; nobody is left to answer."""

    status = 499
    reason = "client closed the connection"


# --- the upstream's side -------------------------------------------------------


class UpstreamError(ProxyError):
    status = 502
    reason = "bad gateway"


class UpstreamConnectError(UpstreamError):
    """Connecting failed: refused, unreachable, DNS, TLS handshake.

    The upstream never saw the request, so it may be retried anywhere.
    """

    reason = "upstream refused the connection"


class UpstreamProtocolError(UpstreamError):
    reason = "upstream sent an invalid response"


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before a response head."""

    reason = "upstream closed the connection"


class RelayError(UpstreamError):
    """A message could not be relayed as received (its framing or headers broke HTTP)."""

    reason = "upstream response could not be relayed"


class UpstreamBrokenMidBody(UpstreamError):
    """The upstream failed after the response head went to the client.

    There is no status left to send: the front end aborts the client
    connection so that a truncated body is never taken for a whole one.
    """

    reason = "upstream broke off the response"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream did not answer in time"


class UpstreamConnectTimeout(UpstreamTimeout):
    reason = "upstream did not accept the connection in time"


class LocalResourcesExhausted(ProxyError):
    """The proxy could not open an upstream connection for want of its own resources:
    file descriptors (``EMFILE``, ``ENFILE``), memory or buffers, or free local ports
    (``EADDRNOTAVAIL``).

    Not the upstream's failure: it counts against no breaker, health state or retry
    budget, and the client gets 503 with ``Retry-After``, as for any overload.
    """

    status = 503
    reason = "proxy out of connections"
    headers = ((b"retry-after", b"1"),)


class NoHealthyUpstream(ProxyError):
    status = 503
    reason = "no upstream available"
    headers = ((b"retry-after", b"1"),)


class PoolTimeout(ProxyError):
    status = 503
    reason = "all upstream connections are busy"


class NoRoute(ProxyError):
    status = 404
    reason = "no route for this request"


# --- the edge's own refusals (trioproxy.edge) -------------------------------------


class AccessDenied(ProxyError):
    """The client's address is not allowed on this route."""

    status = 403
    reason = "access denied"


class KeyMissing(ProxyError):
    """The route needs an API key and the request has none."""

    status = 401
    reason = "API key required"


class KeyRejected(ProxyError):
    """The request's API key is not one of the route's."""

    status = 401
    reason = "invalid API key"


class RateLimited(ProxyError):
    """Over one of the route's rate limits; ``headers`` carry ``Retry-After`` and the
    ``RateLimit-Policy`` / ``RateLimit`` fields."""

    status = 429
    reason = "too many requests"

    def __init__(self, detail: str, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(detail)
        self.headers = headers


class RouteBusy(ProxyError):
    """The route has ``max_inflight`` requests open already."""

    status = 503
    reason = "too many requests in progress"
    headers = ((b"retry-after", b"1"),)


class RateLimitStoreUnavailable(ProxyError):
    """The shared rate limit store failed and ``on_store_error = "deny"``."""

    status = 503
    reason = "rate limit store unavailable"
    headers = ((b"retry-after", b"1"),)
