"""The httptools (llhttp) implementation of the parser seam: the fast one.

llhttp parses in C and calls back per element; the callbacks below turn that
into the seam's event queue. Writing is ours: heads are joined from headers
that were validated when they were parsed (by llhttp, on either side) or are
the proxy's own constants, so nothing is validated twice on the way out.

Where llhttp and the seam's contract differ, this adapter closes the gap:

* llhttp accepts any ``Transfer-Encoding`` ending in ``chunked`` (``gzip,
  chunked``); the contract answers 501 to anything but ``chunked`` alone;
* llhttp cannot be told that a response answers a HEAD request, so the
  parser is stopped at the end of such a head and replaced for the next one;
* llhttp has no end-of-input call, so a body delimited by the connection
  closing (RFC 9112 §6.3 item 8) is ended here, on ``receive_data(b"")``;
* llhttp reads ``GET /path`` CRLF (HTTP/0.9) as the start of a head and waits
  for fields that will never come, so the first line of a head is watched here
  (see ``HttptoolsServer._watch_request_line``).

One thing is done here rather than by llhttp, for speed: the rest of a body
of known length (``Content-Length``) that did not come with its head is not
fed to llhttp, which would copy every slice of it into a new ``bytes``; each
read is passed on as it came and counted here (see ``_Base._pass_through``).

llhttp itself refuses the rest of the contract (CL with TE, repeated
Content-Length, obs-fold, bare CR or LF), as tests/http/test_conformance.py
checks for both implementations.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import httptools

from trioproxy.errors import ProtocolError, RelayError, UpstreamProtocolError
from trioproxy.http.framing import (
    HTTP09,
    UNKNOWN_METHOD,
    check_request_head,
    check_response_head,
    request_line_has_version,
)
from trioproxy.http.protocol import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Body,
    Event,
    Headers,
    RequestHead,
    ResponseHead,
    _Sentinel,
)

#: A well-formed request line (RFC 9112 §3): method token, target, version.
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^\x00-\x20\x7f]+ HTTP/[0-9]\.[0-9]\r\n")
_NO_BODY_STATUSES = frozenset({204, 304})
_OWS = b" \t"
#: What must be left of a body of known length after the read that ended its
#: head for the rest to bypass llhttp: the parser is replaced at the end of such
#: a body (a few µs), worth it only when it saves copying more than a little.
PASS_THROUGH_MIN = 16384
# ``_Base._length`` when it is not a Content-Length.
_NO_PASS = -1
_UNREAD = -2


def _request_parser(protocol: object) -> httptools.HttpRequestParser:
    """llhttp for requests. ``lenient_version``: llhttp refuses HTTP/1.2-1.9 with a
    plain parse error; accepting them here lets the shared head check answer 505,
    as the seam's contract says (and as h11 does)."""
    parser = httptools.HttpRequestParser(protocol)
    parser.set_dangerous_leniencies(lenient_version=True)
    return parser


class _StopAtHead(Exception):
    """Raised from a callback to stop llhttp at the end of a HEAD response's head."""


# Body framing modes of the message we send.
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)


class _Writer:
    """Our side of one cycle: serialises a head and frames its body."""

    __slots__ = ("done", "failed", "mode", "must_close", "remaining", "started")

    def __init__(self) -> None:
        self.reset()
        self.must_close = False
        self.failed = False

    def reset(self) -> None:
        self.mode = _NONE
        self.remaining = 0
        self.started = False
        self.done = False

    def head(self, first_line: bytes, headers: Headers, mode: int, length: int) -> bytes:
        self.mode = mode
        self.remaining = length
        self.started = True
        return _head_bytes(first_line, headers)

    def body(self, data: bytes) -> bytes:
        if not self.started or self.done:
            raise RelayError("body data outside a message")
        mode = self.mode
        if mode == _CHUNKED:
            if not data:
                return b""
            return b"%x\r\n%b\r\n" % (len(data), data)
        if mode == _LENGTH:
            self.remaining -= len(data)
            if self.remaining < 0:
                raise RelayError("too much data for the declared Content-Length")
            return data
        if mode == _CLOSE:
            return data
        if data:
            raise RelayError("body data in a message that has no body")
        return b""

    def end(self) -> bytes:
        if not self.started or self.done:
            raise RelayError("end of a message that was not started")
        self.done = True
        if self.mode == _CHUNKED:
            return b"0\r\n\r\n"
        if self.mode == _LENGTH and self.remaining:
            raise RelayError("message ended before its declared Content-Length")
        if self.mode == _CLOSE:
            self.must_close = True
        return b""


_FIELD_LINE = b": ".join


def _head_bytes(first_line: bytes, headers: Headers) -> bytes:
    """``first_line`` (with its CRLF), the field lines, and the empty line."""
    if not headers:
        return first_line + b"\r\n"
    # Each field line joined in C (map of a bound method): no Python-level
    # step per field.
    return b"%b%b\r\n\r\n" % (first_line, b"\r\n".join(map(_FIELD_LINE, headers)))


def _framing(headers: Headers) -> tuple[int | None, bool, bool]:
    """(Content-Length or None, has Transfer-Encoding, a Connection field says
    close) of headers we are about to send: one pass for all three."""
    length: int | None = None
    chunked = False
    close = False
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection" and b"close" in value.lower():
            close = True
    return length, chunked, close


class _Base:
    """The parsed side: an event queue fed by llhttp callbacks."""

    def __init__(self, max_head_size: int) -> None:
        self._max_head_size = max_head_size
        self._events: deque[Event] = deque()
        self._headers: Headers = []
        self._in_head = False
        self._message_open = False
        self._head_bytes = 0
        self._their_done = False  # delivered EndOfMessage this cycle
        self._peer_complete = 0  # messages completed by the parser, not yet delivered
        self._eof = False
        self._pending = 0  # bytes received after the peer's message completed
        self._keep_alive = True
        self._writer = _Writer()
        # A parse error is raised by next_event once the events before it are
        # delivered, as h11 does: receive_data never raises.
        self._error: Exception | None = None
        # Whether the rest of the body of the head just parsed may bypass llhttp:
        # its Content-Length, _UNREAD (the head's fields say: read them only when
        # the body did not come whole with its head) or _NO_PASS. Decided once,
        # after the feed that ended the head. Then the bytes of it still to come.
        self._length = _NO_PASS
        self._pass_left = 0

    # -- llhttp callbacks shared by both roles --------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._message_open = True
        self._head_bytes = 0
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.rstrip(_OWS)))

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._message_open = False
        self._events.append(END_OF_MESSAGE)
        self._peer_complete += 1

    # -- the seam ------------------------------------------------------------------

    def _check_head_size(self, fed: int) -> None:
        """After a feed: a head still incomplete may not grow past the limit.

        The whole chunk in which a head began counts, which errs on the strict
        side by at most what preceded the head in that chunk; a complete head
        is measured exactly in ``on_headers_complete``.
        """
        if self._in_head:
            self._head_bytes += fed
            if self._head_bytes > self._max_head_size:
                self._head_too_large()

    def _feed(self, data: bytes | bytearray) -> None:
        """Feed llhttp; an error is kept for next_event (callback ones unwrapped)."""
        if self._error is not None:
            return
        try:
            self._parser.feed_data(data)
            self._check_head_size(len(data))
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, _StopAtHead):
                raise context from None
            self._error = context if isinstance(context, Exception) else self._parse_error(str(exc))
        except httptools.HttpParserUpgrade:
            raise
        except httptools.HttpParserInvalidMethodError:
            # llhttp says this for garbage (a TLS hello) as for a method it does not
            # know: only a well-formed request line has an unknown method (501).
            if _METHOD_TOKEN.match(data):
                self._error = ProtocolError("unknown method", status=501, reason=UNKNOWN_METHOD)
            else:
                self._error = self._parse_error("invalid request line")
        except httptools.HttpParserError as exc:
            self._error = self._parse_error(str(exc))
        except (ProtocolError, UpstreamProtocolError) as exc:
            self._error = exc

    def _bypass_rest_of_body(self) -> None:
        """After the feed that ended a head: if llhttp stopped in its body, of known
        length, with enough of it still to come, the rest bypasses llhttp
        (:meth:`_pass_through`). (A later feed would have less left: asked once.)"""
        length, self._length = self._length, _NO_PASS
        if not self._message_open or self._in_head or self._error is not None:
            return
        if length == _UNREAD:
            length = _declared_length(self._headers)
        if length < PASS_THROUGH_MIN:
            return
        # The body parsed so far is in the events queued after its head.
        parsed = 0
        for event in reversed(self._events):
            if type(event) is not Body:
                break
            parsed += len(event.data)
        if length - parsed >= PASS_THROUGH_MIN:
            self._pass_left = length - parsed

    def _pass_through(self, data: bytes | bytearray) -> None:
        """Body bytes of a known length, passed on as they came: llhttp would copy
        them. At the body's end the message ends as llhttp would end it, llhttp
        (left in the middle of that body) is replaced, and what followed in the
        same read is fed to the new one."""
        left = self._pass_left
        size = len(data)
        if size < left:
            self._pass_left = left - size
            self._events.append(Body(data if type(data) is bytes else bytes(data)))
            return
        self._pass_left = 0
        self._events.append(Body(bytes(data[:left]) if size > left else bytes(data)))
        self.on_message_complete()
        self._parser = self._new_parser()
        self._rest_after_body(data[left:])

    def _rest_after_body(self, rest: bytes | bytearray) -> None:
        """What followed the body in its last read: the next message's."""
        if rest:
            self.receive_data(rest)

    def _new_parser(self) -> Any:
        raise NotImplementedError

    def receive_data(self, data: bytes | bytearray) -> None:
        raise NotImplementedError

    def _parse_error(self, detail: str) -> Exception:
        raise NotImplementedError

    _parser: Any  # the role's llhttp parser

    def _head_too_large(self) -> None:
        raise NotImplementedError

    def next_event(self) -> Event | _Sentinel:
        if self._their_done:
            return PAUSED
        if self._events:
            event = self._events.popleft()
            if event is END_OF_MESSAGE:
                self._their_done = True
                self._peer_complete -= 1
            return event
        if self._error is not None:
            raise self._error
        if self._eof:
            return self._at_eof()
        return NEED_DATA

    def _at_eof(self) -> Event:
        raise NotImplementedError

    def send_body(self, data: bytes) -> bytes:
        return self._writer.body(data)

    def send_end(self) -> bytes:
        return self._writer.end()

    def send_failed(self) -> None:
        self._writer.failed = True

    @property
    def reusable(self) -> bool:
        writer = self._writer
        return (
            self._their_done
            and writer.done
            and self._keep_alive
            and not writer.must_close
            and not writer.failed
        )

    @property
    def our_done(self) -> bool:
        return self._writer.done

    @property
    def peer_done(self) -> bool:
        return self._their_done

    @property
    def buffered(self) -> int:
        # A pipelined message parsed in the same read as the current one counts
        # too: the handler must not take the connection for idle.
        if self._their_done and (self._events or self._message_open):
            return max(self._pending, 1)
        return self._pending

    def start_next_cycle(self) -> None:
        if not self.reusable:
            raise RelayError("cannot start a new cycle on this connection")
        self._writer.reset()
        self._their_done = False
        self._pending = 0


class HttptoolsServer(_Base):
    """Server role: parses requests (llhttp), writes responses."""

    def __init__(self, max_head_size: int = 65536) -> None:
        super().__init__(max_head_size)
        self._parser: httptools.HttpRequestParser = _request_parser(self)
        self._url = b""
        self._method: bytes | None = None
        self._version = b"1.1"
        self._expect_continue = False
        self._body_seen = False
        # (keep-alive, expects 100-continue) of each parsed head not yet delivered.
        self._head_meta: deque[tuple[bool, bool]] = deque()
        # What followed an Upgrade request, held unparsed (see trailing_data).
        self._upgrade_tail: bytearray | None = None
        # The bytes of an incomplete head until its first line is whole (see
        # _watch_request_line); None when no head is being watched.
        self._first_line: bytearray | None = None
        # An Upgrade request's body is passing through: what follows it is the tail.
        self._upgrade_after_body = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self._headers
        self._in_head = False
        version = parser.get_http_version().encode("ascii")
        check_request_head(parser.get_method(), self._url, version, headers, self._max_head_size)
        expect = False
        for name, value in headers:
            if name == b"transfer-encoding" and value.lower() != b"chunked":
                raise ProtocolError("unsupported Transfer-Encoding", status=501)
            if name == b"expect" and value.lower() == b"100-continue":
                expect = True
        self._head_meta.append((parser.should_keep_alive(), expect))
        method = parser.get_method()
        self._events.append(
            RequestHead(method=method, target=self._url, headers=headers, http_version=version)
        )
        self._length = _NO_PASS if method == b"CONNECT" else _UNREAD

    def _head_too_large(self) -> None:
        raise ProtocolError("request head too large", status=431)

    def _parse_error(self, detail: str) -> Exception:
        return ProtocolError(detail, status=400)

    def receive_data(self, data: bytes | bytearray) -> None:
        if not data:
            self._eof = True
            return
        if self._pass_left:
            self._pass_through(data)
            return
        if self._upgrade_tail is not None:
            self._upgrade_tail += data
            return
        if self._their_done:
            self._pending += len(data)
        continued = self._message_open
        completed = self._peer_complete
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            # CONNECT or an Upgrade request ended its message; llhttp stops
            # there. What follows is held unparsed, as h11 does: it is the new
            # protocol's if the handler switches (trailing_data), else the
            # next request, parsed afresh by start_next_cycle.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._upgraded_at(data[offset:])
            return
        if self._in_head and self._error is None:
            self._watch_request_line(data, continued or self._peer_complete != completed)
        else:
            if self._first_line is not None:
                self._first_line = None
            if self._length != _NO_PASS:
                if self._message_open:
                    self._bypass_rest_of_body()
                else:  # the usual case: the message came whole
                    self._length = _NO_PASS

    def _new_parser(self) -> httptools.HttpRequestParser:
        return _request_parser(self)

    def _upgraded_at(self, rest: bytes | bytearray) -> None:
        """llhttp stopped at the end of an Upgrade request's *head*, as if it had no
        body. A body it declares belongs to the request (RFC 9110 §7.8: a switch
        comes after the whole request): one of known length is taken here
        (:meth:`_pass_through`), and only what follows it is the tail. llhttp
        cannot be made to parse a chunked one, which is refused (400)."""
        self._length = _NO_PASS
        length, chunked = _framing_received(self._headers)
        if chunked:
            # Its head (and the end llhttp gave it) is not delivered: refused instead.
            if len(self._events) >= 2 and self._events[-1] is END_OF_MESSAGE:
                self._events.pop()
                self._events.pop()
                self._head_meta.pop()
                self._peer_complete -= 1
            self._error = ProtocolError("an Upgrade request with a chunked body", status=400)
            return
        if length and length > 0 and self._events and self._events[-1] is END_OF_MESSAGE:
            self._events.pop()
            self._peer_complete -= 1
            self._message_open = True
            self._parser = self._new_parser()
            self._pass_left = length
            self._upgrade_after_body = True
            if rest:
                self._pass_through(rest)
            return
        self._upgrade_tail = bytearray(rest)

    def _rest_after_body(self, rest: bytes | bytearray) -> None:
        if self._upgrade_after_body:
            self._upgrade_after_body = False
            self._upgrade_tail = bytearray(rest)
        elif rest:
            self.receive_data(rest)

    def _watch_request_line(self, data: bytes | bytearray, behind_other_bytes: bool) -> None:
        """Refuse an HTTP/0.9 request line as soon as it is whole.

        llhttp's callbacks do not say where the request line ends, so the bytes
        of a head are kept until its first line is whole, then judged by
        :func:`request_line_has_version`. Only a head that began at the start
        of a read (after nothing but empty lines) is watched: one that began
        behind another message in the same read is refused when it ends or
        times out, as before. No real HTTP/0.9 client is behind one: 0.9 has
        one request per connection. A complete head (the usual read) costs
        nothing here.
        """
        line = self._first_line
        if line is not None:
            line += data
        elif behind_other_bytes:
            return
        else:
            line = self._first_line = bytearray(data)
        has_version = request_line_has_version(line)
        if has_version is None:
            return
        self._first_line = None  # judged; the rest of this head is llhttp's
        if not has_version:
            self._error = ProtocolError(HTTP09, status=400)

    def next_event(self) -> Event | _Sentinel:
        event = super().next_event()
        if type(event) is RequestHead:
            keep_alive, expect = self._head_meta.popleft()
            self._method = event.method
            self._version = event.http_version
            self._keep_alive = keep_alive
            self._expect_continue = expect and event.http_version == b"1.1"
            self._body_seen = False
        elif type(event) is Body:
            self._body_seen = True
        return event

    def _at_eof(self) -> Event:
        if self._message_open:
            raise ProtocolError("connection closed in the middle of a request")
        return CONNECTION_CLOSED

    def send_informational(self, head: ResponseHead) -> bytes:
        self._expect_continue = False
        if head.status_code == 101:
            self._writer.must_close = True  # no more HTTP on this connection
        return _head_bytes(b"HTTP/1.1 %d %b\r\n" % (head.status_code, head.reason), head.headers)

    def trailing_data(self) -> bytes:
        return bytes(self._upgrade_tail or b"")

    @property
    def buffered(self) -> int:
        if self._upgrade_tail is not None:
            return self._pending + len(self._upgrade_tail)
        return super().buffered

    def send_head(self, head: ResponseHead) -> bytes:
        if self._writer.started:
            raise RelayError("a response head was already sent")
        headers = head.headers
        status = head.status_code
        length, chunked, says_close = _framing(headers)
        no_body = self._method == b"HEAD" or status < 200 or status in _NO_BODY_STATUSES
        if no_body:
            mode = _NONE
        elif length is not None:
            mode = _LENGTH
        elif chunked:
            mode = _CHUNKED
        elif self._version == b"1.1":
            mode = _CHUNKED
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        else:
            mode = _CLOSE
        if says_close:  # (the Transfer-Encoding field added above says nothing of it)
            self._writer.must_close = True
        elif mode == _CLOSE or not self._keep_alive or self._version != b"1.1":
            self._writer.must_close = True
            headers = [*headers, (b"connection", b"close")]
        self._expect_continue = False
        first = b"HTTP/1.1 %d %b\r\n" % (status, head.reason)
        return self._writer.head(first, headers, mode, length or 0)

    @property
    def request_method(self) -> bytes | None:
        return self._method

    @property
    def client_is_waiting_for_100_continue(self) -> bool:
        return self._expect_continue and not self._body_seen and not self._writer.started

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self._method = None
        tail, self._upgrade_tail = self._upgrade_tail, None
        if tail is not None:
            # The upgrade was not taken up: llhttp stopped, so a new parser.
            self._parser = _request_parser(self)
            if tail:
                self.receive_data(bytes(tail))


class HttptoolsClient(_Base):
    """Client role: writes requests, parses responses (1xx other than 101 are skipped)."""

    def __init__(self, max_head_size: int = 65536) -> None:
        super().__init__(max_head_size)
        self._parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._method = b""
        self._informational = False
        self._close_delimited = False
        self._head_seen = False
        self._stopped_at_head = False

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reason = b""

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True
            return
        headers = self._headers
        check_response_head(headers, self._max_head_size)
        self._events.append(
            ResponseHead(
                status_code=status,
                headers=headers,
                reason=self._reason,
                http_version=parser.get_http_version().encode("ascii"),
            )
        )
        self._head_seen = True
        length, chunked = _framing_received(headers)
        if self._method == b"HEAD":
            self._events.append(END_OF_MESSAGE)
            self._peer_complete += 1
            self._keep_alive = parser.should_keep_alive()
            raise _StopAtHead
        self._close_delimited = length is None and not chunked and status not in _NO_BODY_STATUSES
        if length is not None and not chunked and status != 101 and status not in _NO_BODY_STATUSES:
            self._length = length
        else:
            self._length = _NO_PASS

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        super().on_message_complete()

    def _head_too_large(self) -> None:
        raise UpstreamProtocolError("response head too large")

    def _parse_error(self, detail: str) -> Exception:
        return UpstreamProtocolError(detail)

    def receive_data(self, data: bytes | bytearray) -> None:
        if not data:
            self._eof = True
            return
        if self._pass_left:
            self._pass_through(data)
            return
        if self._stopped_at_head or self._their_done:
            # Bytes after a complete response that nobody asked for.
            self._keep_alive = False
            self._pending += len(data)
            return
        try:
            self._feed(data)
        except _StopAtHead:
            # A HEAD response ends with its head; anything after it in the
            # same read was never asked for, so the connection is not reused.
            self._stopped_at_head = True
            self._message_open = False
            if data[-4:] != b"\r\n\r\n":
                self._keep_alive = False
            return
        if self._length != _NO_PASS:
            if self._message_open:
                self._bypass_rest_of_body()
            else:  # the usual case: the message came whole
                self._length = _NO_PASS

    def _new_parser(self) -> httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self)

    def _at_eof(self) -> Event:
        if self._close_delimited and self._head_seen:
            self._close_delimited = False
            self._keep_alive = False
            self._peer_complete += 1
            self._events.append(END_OF_MESSAGE)
            return self.next_event()  # type: ignore[return-value]
        if not self._message_open:
            return CONNECTION_CLOSED
        raise UpstreamProtocolError("connection closed in the middle of a response")

    def send_head(self, head: RequestHead) -> bytes:
        if self._writer.started:
            raise RelayError("a request head was already sent")
        length, chunked, _ = _framing(head.headers)
        if length is not None:
            mode = _LENGTH
        elif chunked:
            mode = _CHUNKED
        else:
            mode = _NONE
        self._method = head.method
        first = b"%b %b HTTP/1.1\r\n" % (head.method, head.target)
        return self._writer.head(first, head.headers, mode, length or 0)

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self._head_seen = False
        if self._stopped_at_head:
            self._parser = httptools.HttpResponseParser(self)
            self._stopped_at_head = False


def _declared_length(headers: Headers) -> int:
    """The Content-Length of a message without Transfer-Encoding, else -1."""
    length, chunked = _framing_received(headers)
    return -1 if length is None or chunked else length


def _framing_received(headers: Headers) -> tuple[int | None, bool]:
    length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked
