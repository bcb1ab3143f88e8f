"""The HTTP/1.1 parser seam.

The downstream connection handler and the upstream client never call a parser
library directly. They drive one small sans-I/O interface, shaped like h11's:

* ``receive_data(bytes)`` feeds what the socket gave (``b""`` means EOF);
* ``next_event()`` returns the next parsed event, or ``NEED_DATA`` when more
  bytes are needed; once the peer's message of this cycle has ended it returns
  ``PAUSED`` or ``NEED_DATA`` (either; callers treat both as "nothing for this
  cycle") until ``start_next_cycle()``;
* ``send_head`` / ``send_body`` / ``send_end`` return the bytes to write;
* ``start_next_cycle()`` moves a keep-alive connection on to its next
  request/response pair.

Events are the plain attrs classes below: values, never changed once made (not
frozen only because a frozen attrs class costs a microsecond more to build, on
every message). Header names are lowercased bytes,
values are the bytes received (leading and trailing whitespace removed);
repeated fields stay separate entries, in order.

Framing contract (RFC 9112 §6). Whatever the implementation, a
*server* protocol refuses, with :class:`trioproxy.errors.ProtocolError`
(status 400 unless noted):

* a request with both ``Content-Length`` and ``Transfer-Encoding``, or several
  differing ``Content-Length`` values (§6.3 items 3 and 5);
* any ``Transfer-Encoding`` other than a single ``chunked`` (501);
* header lines folded onto the next line (obs-fold, §5.2) or ended by a bare LF;
* a head larger than ``max_head_size`` (431), whole or still incomplete;
* an HTTP/1.1 request without exactly one ``Host`` (400, RFC 9112 §3.2);
* a version other than HTTP/1.0 and 1.1 (505; 400 for HTTP/0.9, and a request
  line with no version at all, ``GET /path`` CRLF, as soon as that line is
  whole: such a client sends nothing more and waits).

Refusals are final: once ``next_event`` raised, it raises again.

It does not judge the request-target: refusing absolute-form and CONNECT
targets is the connection handler's policy, done the same for every
implementation.

When a head is sent, the caller's headers are written as given, except that
when they carry neither ``Content-Length`` nor ``Transfer-Encoding`` and a body
may follow, the implementation adds ``Transfer-Encoding: chunked`` for an
HTTP/1.1 peer, and otherwise delimits the body by closing the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol, TypeAlias

import attrs

Headers: TypeAlias = list[tuple[bytes, bytes]]


@attrs.define(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"


@attrs.define(slots=True)
class ResponseHead:
    status_code: int
    headers: Headers
    reason: bytes = b""
    http_version: bytes = b"1.1"


@attrs.define(slots=True)
class Body:
    data: bytes


@attrs.frozen(slots=True)
class EndOfMessage:
    pass


@attrs.frozen(slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly between messages."""


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
PAUSED: Final = _Sentinel("PAUSED")

END_OF_MESSAGE: Final = EndOfMessage()
CONNECTION_CLOSED: Final = ConnectionClosed()

Event: TypeAlias = RequestHead | ResponseHead | Body | EndOfMessage | ConnectionClosed


class HTTPProtocol(Protocol):
    """What both roles share."""

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""

    def next_event(self) -> Event | _Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED``.

        Raises:
            ProtocolError: the peer's bytes are not valid HTTP/1.1 (for the
                server role) or :class:`UpstreamProtocolError` (client role).
        """

    def send_body(self, data: bytes) -> bytes: ...

    def send_end(self) -> bytes: ...

    def send_failed(self) -> None:
        """Our write was cancelled or failed midway: the connection is unusable."""

    def start_next_cycle(self) -> None: ...

    @property
    def reusable(self) -> bool:
        """Both messages of this cycle are complete and neither side asked to close."""

    @property
    def peer_done(self) -> bool:
        """The peer's message of this cycle was received to its end."""

    @property
    def our_done(self) -> bool:
        """Our message of this cycle was sent to its end."""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (pipelined data, for backpressure)."""


class ServerProtocol(HTTPProtocol, Protocol):
    def send_head(self, head: ResponseHead) -> bytes: ...

    def send_informational(self, head: ResponseHead) -> bytes:
        """A 1xx head (``100 Continue``) before the final response, or the ``101`` of an upgrade."""

    @property
    def request_method(self) -> bytes | None: ...

    @property
    def client_is_waiting_for_100_continue(self) -> bool:
        """The request said ``Expect: 100-continue`` and no body or response was sent yet."""

    def trailing_data(self) -> bytes:
        """The bytes received after an ``Upgrade`` request, unparsed (RFC 9110 §7.8).

        The parser stops at the end of a request that proposes to switch
        protocols, as h11 does: what the client sent next belongs to the new
        protocol if the switch is made (a ``101`` from ``send_informational``),
        and is parsed as the next request after ``start_next_cycle`` if not.
        """


class ClientProtocol(HTTPProtocol, Protocol):
    def send_head(self, head: RequestHead) -> bytes: ...


ServerFactory: TypeAlias = Callable[[int], ServerProtocol]
ClientFactory: TypeAlias = Callable[[int], ClientProtocol]
