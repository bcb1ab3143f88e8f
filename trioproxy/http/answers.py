"""What a front end answers by itself: admission of a request head, and the
responses the proxy makes (errors, ``respond`` routes). Sans-I/O: every front
end (the HTTP/1.1 server, the ASGI app) calls these and writes the result its
own way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from trioproxy.errors import MethodNotAllowed, ProtocolError, ProxyError
from trioproxy.http.cors import is_preflight
from trioproxy.http.headers import get_first, reason_phrase
from trioproxy.http.protocol import Headers, RequestHead
from trioproxy.http.transforms import format_process_time

if TYPE_CHECKING:
    from trioproxy.snapshot import Route

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


def local_answer(
    head: RequestHead, route: Route, *, client_addr: str, request_id: bytes
) -> Answer | None:
    """The answer the proxy gives itself on ``route``, or None to go upstream.

    A CORS preflight on a route with a CORS policy, and every request on a
    ``respond`` route. The server's and the route's response header rules
    apply to a ``respond`` answer as to an upstream's, and so do the CORS
    fields of an actual request.
    """
    cors = route.cors
    if cors is not None and is_preflight(head.method, head.headers):
        preflight = cors.preflight(head.headers)
        headers = [(n, v) for n, v in preflight.headers if n != b"content-length"]
        return Answer(preflight.status, headers, preflight.body)
    respond = route.settings.respond
    if respond is None:
        return None
    headers = [(b"content-type", respond.content_type.encode()), (b"x-request-id", request_id)]
    values = route.template_values(head, client_addr, request_id)
    if values is not None:
        values.process_time = format_process_time(0.0)
    headers = route.response_headers(headers, values, get_first(head.headers, b"origin"))
    return Answer(respond.status, headers, respond.body.encode())
