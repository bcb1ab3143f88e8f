"""Rules on a parsed message head that every parser implementation applies.

Parsers differ in what they let through (see the two adapters); these checks
run on the seam's own events, so both refuse the same heads the same way.
"""

from __future__ import annotations

from trioproxy.errors import ProtocolError, UpstreamProtocolError
from trioproxy.http.protocol import Headers

_VERSIONS = (b"1.1", b"1.0")

#: The methods both parsers know (llhttp's list, the stricter of the two): any
#: other answers 501 (RFC 9110 §9.1), so --http h11 and httptools agree.
KNOWN_METHODS = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS TRACE PATCH CONNECT COPY LOCK MKCOL MOVE PROPFIND "
    b"PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE "
    b"M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
UNKNOWN_METHOD = "method not implemented by this proxy"
HTTP09 = "HTTP/0.9 request"
_LINE_ENDS = b"\r\n"


def head_size(start_line_len: int, headers: Headers) -> int:
    """The size of a head as received, up to the line ends (close enough for a limit)."""
    size = start_line_len
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size


def request_line_has_version(received: bytes | bytearray) -> bool | None:
    """Whether the request line at the start of ``received`` ends in an HTTP version.

    ``None`` while the line is incomplete. ``False`` is an HTTP/0.9-style line
    (``GET /path`` CRLF): such a client sends no header fields and no empty line,
    and waits for an answer, so a parser that waits for the end of the head would
    hold the connection until the header timeout. Both adapters ask this while a
    head is incomplete and refuse the request at once (400, as nginx does).
    Empty lines before the request line are skipped (RFC 9112 §2.2).
    """
    start = 0
    size = len(received)
    while start < size and received[start] in _LINE_ENDS:
        start += 1
    end = received.find(b"\n", start)
    if end < 0:
        return None
    parts = bytes(received[start:end]).rstrip(b"\r").split(b" ")
    # RFC 9112 §3: method SP request-target SP HTTP-version.
    return len(parts) >= 3 and parts[-1].startswith(b"HTTP/")


def check_request_head(
    method: bytes, target: bytes, http_version: bytes, headers: Headers, limit: int
) -> None:
    """Refuse a request head the proxy must not forward.

    Raises:
        ProtocolError: 501 for a method outside KNOWN_METHODS; 431 over ``limit``;
            505 for a version other than 1.0/1.1;
            400 for Content-Length with Transfer-Encoding (RFC 9112 §6.3) or an
            HTTP/1.1 request without exactly one Host (RFC 9112 §3.2).
    """
    if method not in KNOWN_METHODS:
        raise ProtocolError("unknown method", status=501, reason=UNKNOWN_METHOD)
    if http_version not in _VERSIONS:
        if http_version[:1] in (b"0", b""):
            raise ProtocolError(HTTP09, status=400)
        raise ProtocolError(
            "unsupported HTTP version", status=505, reason="HTTP version not supported"
        )
    has_te = False
    has_cl = False
    hosts = 0
    size = len(target)
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"transfer-encoding":
            has_te = True
        elif name == b"content-length":
            has_cl = True
        elif name == b"host":
            hosts += 1
    if size > limit:
        raise ProtocolError("request head too large", status=431)
    if has_te and has_cl:
        reason = "both Content-Length and Transfer-Encoding"
        raise ProtocolError(reason, status=400, reason=reason)
    if hosts > 1 or (hosts == 0 and http_version == b"1.1"):
        reason = "an HTTP/1.1 request needs exactly one Host header"
        raise ProtocolError(reason, status=400, reason=reason)


def check_response_head(headers: Headers, limit: int) -> None:
    """Raises UpstreamProtocolError for a response head over ``limit``."""
    if head_size(16, headers) > limit:
        raise UpstreamProtocolError("response head too large")
