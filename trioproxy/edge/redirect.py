"""``tls.redirect_http``: a plain listener whose every answer is a 308 to https.

The answer (sans-I/O, :func:`redirect_answer`) is ``308 Permanent Redirect``
(RFC 9110 §15.4.9: the method and body are kept on the retry, unlike 301)
with ``Location: https://HOST[:PORT]TARGET``: the client's Host name without
its port, the TLS listener's port unless it is 443, and the request-target byte
for byte. A request without a usable Host gets 400; so does one whose target is
not origin-form. Each connection serves one request and closes: nothing is
proxied here, so nothing is worth a keep-alive.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import trio

from trioproxy.errors import ProtocolError, ProxyError
from trioproxy.http.answers import TEXT, Answer, error_answer, framed
from trioproxy.http.first_head import read_request_head
from trioproxy.http.headers import get_first
from trioproxy.http.protocol import RequestHead, ResponseHead, ServerProtocol

log = logging.getLogger("trioproxy.tls")

__all__ = ["redirect_answer", "serve_redirect"]

# A host name, an IPv4 address or a bracketed IPv6 literal, then an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d*)?")


def redirect_answer(head: RequestHead, https_port: int) -> Answer:
    """The 308 to the https URL of ``head`` (or a 400 saying why there is none)."""
    host = get_first(head.headers, b"host")
    match = _HOST.fullmatch(host) if host is not None else None
    if match is None or not head.target.startswith(b"/"):
        reason = "no https URL for this request (Host or target)"
        return error_answer(ProtocolError(reason, reason=reason))
    port = b"" if https_port == 443 else b":%d" % https_port
    location = b"https://" + match[1].lower() + port + head.target
    body = b"308 Permanent Redirect: use https\n"
    return Answer(308, [(b"content-type", TEXT), (b"location", location)], body)


async def serve_redirect(
    stream: trio.abc.Stream,
    *,
    https_port: int,
    header_timeout: float,
    protocol_factory: Callable[[int], ServerProtocol],
    max_header_size: int,
) -> None:
    """Read one request head from ``stream`` (within ``header_timeout``) and answer it.

    Resource handling: the caller owns ``stream`` and closes it.
    """
    protocol = protocol_factory(max_header_size)
    head: RequestHead | None = None
    answer: Answer | None = None
    with trio.move_on_after(header_timeout):
        try:
            head = await read_request_head(stream, protocol, 65536)
            if head is None:
                return
        except ProxyError as exc:  # a ProtocolError: malformed, too large
            answer = error_answer(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
    if answer is None:
        if head is None:
            return  # too slow: nothing to answer
        answer = redirect_answer(head, https_port)
    try:
        data = protocol.send_head(
            ResponseHead(answer.status, framed(answer, close=True), answer.reason)
        )
        if head is None or head.method != b"HEAD":
            data += protocol.send_body(answer.body)
        data += protocol.send_end()
    except ProxyError as exc:  # the protocol refuses to answer in its state
        log.debug("redirect: could not answer: %s", exc.detail)
        return
    try:
        with trio.move_on_after(header_timeout):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
