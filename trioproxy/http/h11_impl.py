"""The h11 implementation of the parser seam (the reference one).

h11 is lenient where a proxy must not be (RFC 9112 §5.2, §2.2, §6.3): it
splits head lines on a bare LF, unfolds obs-fold continuation lines, and when a
request carries both ``Transfer-Encoding`` and ``Content-Length`` it quietly lets
the first win. A proxy that accepts what the server behind it reads differently
is a request-smuggling vector, so this adapter refuses all three itself:

* head lines are checked raw, before h11 splits them, by a strict subclass of
  h11's receive buffer (a private class: pyproject pins h11 to 0.16.x, and
  tests/http/test_conformance.py pins the behaviour);
* framing headers are checked on the parsed request.

Writing trusts the caller's headers, as the httptools adapter does: they were
validated when they were parsed (by h11 and the checks here, on either side) or
are the proxy's own values. So heads are handed to h11 with ``_parsed=True``,
the flag h11's own readers pass, which skips its per-field regexes but keeps the
rest: h11 still reads the framing headers for its state machine, refuses
conflicting ``Content-Length`` and foreign ``Transfer-Encoding`` values, and
checks the method and target (tests/http/test_h11_impl.py pins all of that).
Re-validating every field of every head cost about a tenth of a proxied
request's CPU in h11 mode.
"""

from __future__ import annotations

from typing import Any, Final

import h11
from h11._receivebuffer import ReceiveBuffer
from h11._state import MIGHT_SWITCH_PROTOCOL as _MIGHT_SWITCH

from trioproxy.errors import ProtocolError, RelayError, UpstreamProtocolError
from trioproxy.http.framing import (
    HTTP09,
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
    RequestHead,
    ResponseHead,
    _Sentinel,
)


class _StrictReceiveBuffer(ReceiveBuffer):
    """h11's buffer, refusing bare-LF line ends and obs-fold in heads.

    Each call checks only the complete lines that arrived since the last one,
    so a head trickled in one byte at a time costs linear, not quadratic, time.
    """

    _checked = 0  # bytes of the head being received already checked

    def maybe_extract_lines(self) -> list[bytearray] | None:
        data = self._data
        start = self._checked
        head_end = data.find(b"\r\n\r\n", max(0, start - 3))
        if head_end != -1:
            # A "\n\n" before it is a bare LF, which the check below refuses.
            _check_head_lines(data[: head_end + 2])
        else:
            if data.find(b"\n\n", max(0, start - 1)) != -1:
                raise h11.LocalProtocolError(_BARE_LF)
            last = data.rfind(b"\n", start)
            if last != -1:
                # Check the complete lines seen so far, to fail early; a line
                # folded onto the previous one needs that one's end in view.
                _check_head_lines(data[max(0, start - 2) : last + 1])
                self._checked = last + 1
        lines = super().maybe_extract_lines()
        if lines is not None:
            self._checked = 0
        return lines


_BARE_LF = "bare LF in message head"
_OBS_FOLD = "obsolete line folding in message head"
_BARE_CR = "bare CR in message head"
_MANY_LENGTHS = "more than one Content-Length"
_CONTROL = "control character in message head"
# RFC 9110 §5.5: no CTL but HTAB in a field value (h11 lets 0x01-0x1f and 0x7f
# through; llhttp refuses them: refusing here too keeps the parsers alike).
# Deleting every allowed byte leaves the forbidden ones: one C-level pass, where
# a regex character class costs several times more per byte.
_CONTROLS = frozenset(range(0x00, 0x09)) | {0x0B, 0x0C} | frozenset(range(0x0E, 0x20)) | {0x7F}
_NOT_CONTROL = bytes(byte for byte in range(256) if byte not in _CONTROLS)
#: Our own messages are fixed texts, safe to show the client; h11's quote its input.
_OWN_REASONS = frozenset({_BARE_LF, _OBS_FOLD, _BARE_CR, _MANY_LENGTHS, _CONTROL})


def _check_head_lines(head: bytearray) -> None:
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf:
        raise h11.LocalProtocolError(_BARE_LF)
    if b"\r\n " in head or b"\r\n\t" in head:
        raise h11.LocalProtocolError(_OBS_FOLD)
    if head.count(b"\r") != crlf:
        raise h11.LocalProtocolError(_BARE_CR)
    if head.translate(None, _NOT_CONTROL):
        raise h11.LocalProtocolError(_CONTROL)
    # h11 merges equal repeated Content-Length lines (and "3, 3"); llhttp and
    # nginx refuse them, and so do we (RFC 9112 §6.3 item 5 allows either).
    lowered = head.lower()
    count = lowered.count(b"\ncontent-length:")
    if count > 1 or (
        count and b"," in lowered.split(b"\ncontent-length:", 1)[1].split(b"\r", 1)[0]
    ):
        raise h11.LocalProtocolError(_MANY_LENGTHS)


# By our role, the peer's states in which h11, given an empty buffer and no EOF,
# can only answer NEED_DATA: it waits for a head (or, for a client before its
# request, expects nothing). Each role asks once per cycle before the bytes are in, and
# h11 takes ~25k instructions to say so; tests/http/test_h11_impl.py checks the
# answer against h11's own for every state.
_HEAD_AWAITED = {h11.SERVER: (h11.IDLE,), h11.CLIENT: (h11.IDLE, h11.SEND_RESPONSE)}


#: h11's events are immutable, and one without trailers is all we send: building
#: it costs ~6k instructions, twice per proxied request.
_END: Final = h11.EndOfMessage()


def _common_event(event: object) -> Event | _Sentinel:
    """The seam's event for an h11 event both roles share (everything but heads)."""
    if type(event) is h11.Data:
        return Body(bytes(event.data))
    if type(event) is h11.EndOfMessage:
        return END_OF_MESSAGE
    if event is h11.NEED_DATA:
        return NEED_DATA
    if event is h11.PAUSED:
        return PAUSED
    if type(event) is h11.ConnectionClosed:
        return CONNECTION_CLOSED
    raise AssertionError(f"unexpected h11 event {event!r}")  # pragma: no cover


class _H11Base:
    __slots__ = ("_buffer", "_conn", "_eof", "_head_awaited")

    def __init__(self, role: type[h11.SERVER] | type[h11.CLIENT], max_head_size: int) -> None:
        self._conn = h11.Connection(role, max_incomplete_event_size=max_head_size)
        self._buffer = self._conn._receive_buffer = _StrictReceiveBuffer()
        self._eof = False
        self._head_awaited = _HEAD_AWAITED[role]

    def receive_data(self, data: bytes | bytearray) -> None:
        if not data:
            self._eof = True
        self._conn.receive_data(data)  # type: ignore[arg-type]  # h11 copies into its buffer

    def _nothing_to_read(self) -> bool:
        """h11's next_event would return NEED_DATA, known without asking it."""
        return not (self._buffer._data or self._eof) and (
            self._conn.their_state in self._head_awaited
        )

    def send_body(self, data: bytes) -> bytes:
        return self._send(h11.Data(data=data))

    def send_end(self) -> bytes:
        return self._send(_END)

    def _send(self, event: Any) -> bytes:
        """h11's send, with its refusal mapped: what we relay broke the framing.

        That can only come from the other side of the proxy (say, an upstream
        response body longer than its Content-Length), so it is a relay error.
        """
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise RelayError(str(exc)) from None

    def send_failed(self) -> None:
        self._conn.send_failed()

    def start_next_cycle(self) -> None:
        self._conn.start_next_cycle()

    @property
    def reusable(self) -> bool:
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    @property
    def our_done(self) -> bool:
        return self._conn.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def peer_done(self) -> bool:
        # MIGHT_SWITCH_PROTOCOL: an Upgrade request that ended, waiting for our answer.
        return self._conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, _MIGHT_SWITCH)

    @property
    def buffered(self) -> int:
        return len(self._buffer._data)  # h11's trailing_data, without copying it


class H11Server(_H11Base):
    """Server role: parses requests, writes responses."""

    __slots__ = ("_error", "_max_head_size")

    def __init__(self, max_head_size: int = 65536) -> None:
        super().__init__(h11.SERVER, max_head_size)
        self._max_head_size = max_head_size
        self._error: ProtocolError | None = None

    def next_event(self) -> Event | _Sentinel:
        if self._error is not None:
            raise self._error  # a refusal is final, as h11's own are
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event | _Sentinel:
        if self._nothing_to_read():
            return NEED_DATA
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            detail = str(exc)
            reason = detail if detail in _OWN_REASONS else ""
            raise ProtocolError(detail, status=exc.error_status_hint, reason=reason) from None
        if event is h11.NEED_DATA:
            # A head is incomplete: if its first line is whole and has no version,
            # it is HTTP/0.9 and no more of it will come (see request_line_has_version).
            # h11's buffer starts at this head: it parses the next one only once
            # the cycle before it ended.
            if (
                self._conn.their_state is h11.IDLE
                and request_line_has_version(self._buffer._data) is False
            ):
                raise ProtocolError(HTTP09, status=400)
            return NEED_DATA
        if type(event) is h11.Request:
            headers = list(event.headers)
            check_request_head(
                event.method, event.target, event.http_version, headers, self._max_head_size
            )
            return RequestHead(
                method=event.method,
                target=event.target,
                headers=headers,
                http_version=event.http_version,
            )
        return _common_event(event)

    def send_head(self, head: ResponseHead) -> bytes:
        event = h11.Response(
            status_code=head.status_code, headers=head.headers, reason=head.reason, _parsed=True
        )
        return self._send(event)

    def send_informational(self, head: ResponseHead) -> bytes:
        event = h11.InformationalResponse(
            status_code=head.status_code, headers=head.headers, reason=head.reason
        )
        return self._send(event)

    @property
    def request_method(self) -> bytes | None:
        return self._conn._request_method

    @property
    def client_is_waiting_for_100_continue(self) -> bool:
        return bool(self._conn.client_is_waiting_for_100_continue)

    def trailing_data(self) -> bytes:
        # h11 pauses after a request proposing a switch; its buffer holds the rest.
        return bytes(self._conn.trailing_data[0])


class H11Client(_H11Base):
    """Client role: writes requests, parses responses (1xx other than 101 are skipped)."""

    __slots__ = ("_max_head_size",)

    def __init__(self, max_head_size: int = 65536) -> None:
        super().__init__(h11.CLIENT, max_head_size)
        self._max_head_size = max_head_size

    def next_event(self) -> Event | _Sentinel:
        if self._nothing_to_read():
            return NEED_DATA
        try:
            event = self._conn.next_event()
            while type(event) is h11.InformationalResponse:
                event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamProtocolError(str(exc)) from None
        if type(event) is h11.Response:
            headers = list(event.headers)
            check_response_head(headers, self._max_head_size)
            return ResponseHead(
                status_code=event.status_code,
                headers=headers,
                reason=event.reason,
                http_version=event.http_version,
            )
        return _common_event(event)

    def send_head(self, head: RequestHead) -> bytes:
        event = h11.Request(
            method=head.method, target=head.target, headers=head.headers, _parsed=True
        )
        return self._send(event)
