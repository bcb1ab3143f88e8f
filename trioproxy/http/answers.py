"""What a front end answers by itself: admission of a request head, and the
responses the proxy makes (errors, ``respond`` routes). Sans-I/O: every front
end (the HTTP/1.1 server, the ASGI app) calls these and writes the result its
own way.
"""

from __future__ import annotations

import attrs

from trioproxy.errors import MethodNotAllowed, ProtocolError, ProxyError
from trioproxy.http.headers import reason_phrase
from trioproxy.http.protocol import Headers, RequestHead

TEXT = b"text/plain; charset=utf-8"


@attrs.frozen
class Answer:
    """A whole response made by the proxy."""

    status: int
    headers: Headers
    body: bytes

    @property
    def reason(self) -> bytes:
        return reason_phrase(self.status)


def admission_error(head: RequestHead) -> ProxyError | None:
    """Why a reverse proxy must not pass this request on (RFC 9112 §3.2), or None.

    Only origin-form targets (``/path?query``) are forwarded, and ``*`` for
    ``OPTIONS``; ``CONNECT`` asks for a tunnel, which a reverse proxy does not
    open (405).
    """
    if head.method == b"CONNECT":
        return MethodNotAllowed("CONNECT")
    target = head.target
    if not (target.startswith(b"/") or (target == b"*" and head.method == b"OPTIONS")):
        reason = "request-target must be in origin-form (a path)"
        return ProtocolError(reason, reason=reason)
    return None


def error_answer(exc: ProxyError, *, request_id: bytes = b"") -> Answer:
    """``STATUS PHRASE: reason`` as plain text, with the error's own headers
    (``Retry-After``...). The detail (which may name upstreams) stays in the log."""
    status = exc.status
    body = f"{status} {reason_phrase(status).decode()}: {exc.reason}\n".encode()
    headers = [(b"content-type", TEXT), *exc.headers]
    if request_id:
        headers.append((b"x-request-id", request_id))
    return Answer(status, headers, body)


def framed(answer: Answer, *, close: bool) -> Headers:
    """The answer's headers with its ``Content-Length`` (and ``Connection: close``)."""
    headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return headers
