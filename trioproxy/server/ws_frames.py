"""WebSocket frames as the tunnel relays them: sans-I/O, no trio.

The proxy reads only the frame headers of what it relays (RFC 6455 §5.2) and
passes payloads on without building messages. No extension is negotiated on
either side (see :mod:`trioproxy.server.websocket`), so a frame means the same
thing on both, and:

* A client's frames are masked (§5.3) and the proxy is the upstream's client,
  whose frames must be masked too: the client's frames go on byte for byte,
  with the client's masking key. The upstream's frames are not masked and go
  to the client as they are. A read that holds whole frames costs no copy of
  their payloads. (The key is the client's choice, as behind nginx, which
  passes the bytes on unread: masking guards against scripts in a browser,
  which never see the key, §10.3.)
* A frame whose payload spans reads goes on in pieces, each a frame of its own
  (§5.4 lets an intermediary refragment when no extension is negotiated), so
  that each write ends on a frame boundary and a close frame can always follow.
  A masked piece keeps the client's key, rotated to where the piece starts:
  its payload bytes are not touched.
* The fragments of one message that arrive in one read go on as one frame
  (masked ones unmasked and masked again with the first one's key): a message
  sent as a flood of tiny fragments costs one frame per read.

What is still checked, as an endpoint would (§5.1, §5.2, §5.4, §5.5, §8.1),
and fails with :class:`FrameError` and its close code: reserved bits set
(1002), unknown opcodes (1002), masking the wrong way round (1002),
non-minimal lengths (1002), control frames that are fragmented or over 125
bytes (1002), continuation frames out of sequence (1002), text that is not
UTF-8 (1007: a text payload is unmasked to check it, ASCII at C speed), close
frames with a bad code or reason (1002 / 1007), and messages over the size
limit (1009, known from the frame headers before their payload is passed on).
"""

from __future__ import annotations

import codecs
import enum
import os
import struct
from typing import Final

import attrs

# RFC 6455 §5.2
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
_CONTROL: Final = frozenset({CLOSE, PING, PONG})
MAX_CONTROL_PAYLOAD: Final = 125

# RFC 6455 §7.4
PROTOCOL_ERROR: Final = 1002
INVALID_PAYLOAD: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
NO_STATUS: Final = 1005
#: Codes an endpoint must not send (§7.4.1): sent as 1000 by the proxy, refused when received.
_LOCAL_ONLY: Final = frozenset({1005, 1006, 1015})
#: Codes below 3000 that are defined (§7.4.1, §11.7); the rest of 1000-2999 is reserved.
_DEFINED: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class FrameError(Exception):
    """The peer broke RFC 6455 or the size limit: the close ``code`` it gets."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class Close:
    """A close frame, read (1005 when it had no code, §7.1.5)."""

    code: int
    reason: str


# --- the closing handshake of one side (RFC 6455 §7.1.2 - §7.1.4) -------------------------


class CloseState(enum.Enum):
    OPEN = "open"
    #: We sent a close frame; its answer has not come.
    LOCAL_CLOSING = "local closing"
    #: It sent a close frame; we have not answered.
    REMOTE_CLOSING = "remote closing"
    CLOSED = "closed"


_AFTER_SENDING_CLOSE: Final = {
    CloseState.OPEN: CloseState.LOCAL_CLOSING,
    CloseState.REMOTE_CLOSING: CloseState.CLOSED,
}
_AFTER_RECEIVING_CLOSE: Final = {
    CloseState.OPEN: CloseState.REMOTE_CLOSING,
    CloseState.LOCAL_CLOSING: CloseState.CLOSED,
}


def after_sending_close(state: CloseState) -> CloseState:
    """Raises ValueError (naming the state) when a close may not be sent."""
    try:
        return _AFTER_SENDING_CLOSE[state]
    except KeyError:
        raise ValueError(f"cannot send a close frame in state {state.value}") from None


def after_receiving_close(state: CloseState) -> CloseState:
    try:
        return _AFTER_RECEIVING_CLOSE[state]
    except KeyError:
        raise ValueError(f"cannot receive a close frame in state {state.value}") from None


# --- writing ---------------------------------------------------------------------------


def frame_header(opcode: int, *, fin: bool, length: int, key: bytes = b"") -> bytes:
    """A frame's header; masked when ``key`` (4 bytes) is given."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if key else 0
    if length <= MAX_CONTROL_PAYLOAD:
        return bytes((first, mask_bit | length)) + key
    if length <= 0xFFFF:
        return struct.pack("!BBH", first, mask_bit | 126, length) + key
    return struct.pack("!BBQ", first, mask_bit | 127, length) + key


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame from the proxy; 1005 is sent as no code, other local-only ones as 1000."""
    if code == NO_STATUS:
        payload = b""
    else:
        if code in _LOCAL_ONLY:
            code = 1000
        payload = struct.pack("!H", code) + _truncate_utf8(reason.encode(), MAX_CONTROL_PAYLOAD - 2)
    if not masked:
        return frame_header(CLOSE, fin=True, length=len(payload)) + payload
    # A fresh key from a strong source for a frame of our own (RFC 6455 §5.3).
    key = os.urandom(4)
    return frame_header(CLOSE, fin=True, length=len(payload), key=key) + mask(payload, key)


def _truncate_utf8(data: bytes, size: int) -> bytes:
    return data[:size].decode("utf-8", "ignore").encode("utf-8")


_XOR_TABLES: Final = [bytes(a ^ b for a in range(256)) for b in range(256)]


def mask(data: bytes | bytearray, key: bytes) -> bytes:
    """``data`` XOR the repeated ``key`` (masking and unmasking are the same, §5.3)."""
    n = len(data)
    if n <= 256:
        # One big-integer XOR: the cheapest for small payloads.
        repeated = (key * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
            n, "little"
        )
    out = bytearray(data)
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


def _rotate(key: bytes, by: int) -> bytes:
    """The key of a payload that starts ``by`` bytes further on."""
    by %= 4
    return key[by:] + key[:by] if by else key


# --- reading ---------------------------------------------------------------------------


class _Piece:
    """A data frame, or the part of one that came in this read: what goes on."""

    __slots__ = ("fin", "key", "opcode", "payload", "raw")

    def __init__(
        self, opcode: int, fin: bool, payload: bytes, key: bytes, raw: bytes | None
    ) -> None:
        self.opcode = opcode
        self.fin = fin
        self.payload = payload  # as received (masked with ``key`` when there is one)
        self.key = key
        self.raw = raw  # the whole frame as received, when it came whole


class FrameReader:
    """Reads one side's frames (see the module docstring).

    Args:
        masked: the side is a client, whose frames must be masked; else they must not be.
        max_message_size: the largest message, in payload bytes over its fragments.
    """

    __slots__ = (
        "_buffer",
        "_fin",
        "_key",
        "_masked",
        "_max_message_size",
        "_message_opcode",
        "_message_size",
        "_next_opcode",
        "_remaining",
        "_utf8",
        "closed",
        "error",
    )

    def __init__(self, *, masked: bool, max_message_size: int) -> None:
        self._masked = masked
        self._max_message_size = max_message_size
        self._buffer = b""  # the start of a header or of a control frame
        # The data frame being read: its payload bytes still to come, its fin
        # bit, the opcode its next piece goes with, its key at that piece.
        self._remaining = 0
        self._fin = False
        self._next_opcode = CONTINUATION
        self._key = b""
        # The message being read: TEXT or BINARY (0: none), its size so far,
        # and a UTF-8 decoder once a text message had a non-ASCII byte.
        self._message_opcode = 0
        self._message_size = 0
        self._utf8: codecs.IncrementalDecoder | None = None
        #: Its close frame was read: what follows is not (RFC 6455 §1.4).
        self.closed = False
        #: It broke the protocol or the limit: nothing more is read.
        self.error: FrameError | None = None

    def feed(self, data: bytes | bytearray) -> list[bytes | Close]:
        """What ``data`` holds for the other side, in order: frames to write and a close.

        When the bytes break the rules, what came before goes on, ``error`` is
        set and nothing more is read.
        """
        if self.closed or self.error is not None:
            return []
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        out: list[bytes | Close] = []
        run: list[_Piece] = []  # pieces of one message, to go as one frame
        try:
            self._read(bytes(data) if isinstance(data, bytearray) else data, out, run)
        except FrameError as exc:
            self.error = exc
        if run:
            out.append(_join(run))
        return out

    def _read(self, data: bytes, out: list[bytes | Close], run: list[_Piece]) -> None:
        end = len(data)
        pos = 0
        if self._remaining:
            pos = self._payload(data, 0, None, run)
            if self._remaining:
                return
            if run[-1].fin:
                out.append(_join(run))
                run.clear()
        while pos < end:
            # RFC 6455 §5.2: the header.
            if end - pos < 2:
                self._buffer = data[pos:]
                return
            first = data[pos]
            second = data[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                start += 2
            elif length == 127:
                start += 8
            masked = second & 0x80
            if masked:
                start += 4
            if end < start:
                self._buffer = data[pos:]
                return
            if first & 0x70:
                raise FrameError(PROTOCOL_ERROR, "reserved bits set, no extension negotiated")
            if bool(masked) is not self._masked:
                raise FrameError(
                    PROTOCOL_ERROR,
                    "client frame not masked" if self._masked else "server frame masked",
                )
            if length >= 126:
                length = self._long_length(data, pos, length)
            fin = bool(first & 0x80)
            key = data[start - 4 : start] if masked else b""
            if opcode in _CONTROL:
                if not fin or length > MAX_CONTROL_PAYLOAD:
                    raise FrameError(PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
                if end - start < length:
                    self._buffer = data[pos:]
                    return
                payload = data[start : start + length]
                if opcode == CLOSE:
                    if run:
                        out.append(_join(run))
                        run.clear()
                    out.append(_read_close(mask(payload, key) if key else payload))
                    self.closed = True
                    return
                if run:
                    out.append(_join(run))
                    run.clear()
                out.append(data[pos : start + length])  # ping and pong go as they came
                pos = start + length
                continue
            self._start_frame(opcode, fin, length, key)
            raw = data[pos : start + length] if end - start >= length else None
            pos = self._payload(data, start, raw, run)
            if run and run[-1].fin:
                out.append(_join(run))
                run.clear()

    def _long_length(self, data: bytes, pos: int, length: int) -> int:
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos + 2)
            if length <= MAX_CONTROL_PAYLOAD:
                raise FrameError(PROTOCOL_ERROR, "length not in its shortest form")
            return int(length)
        (length,) = struct.unpack_from("!Q", data, pos + 2)
        if length <= 0xFFFF or length >> 63:
            raise FrameError(PROTOCOL_ERROR, "length not in its shortest form or too large")
        return int(length)

    def _start_frame(self, opcode: int, fin: bool, length: int, key: bytes) -> None:
        if opcode == CONTINUATION:
            if not self._message_opcode:
                raise FrameError(PROTOCOL_ERROR, "continuation frame without a message")
        elif opcode == TEXT or opcode == BINARY:
            if self._message_opcode:
                raise FrameError(PROTOCOL_ERROR, "new message before the last one ended")
            self._message_opcode = opcode
        else:
            raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        self._message_size += length
        if self._message_size > self._max_message_size:
            raise FrameError(MESSAGE_TOO_BIG, "message too big")
        self._remaining = length
        self._fin = fin
        self._next_opcode = opcode
        self._key = key

    def _payload(self, data: bytes, start: int, raw: bytes | None, run: list[_Piece]) -> int:
        """Take what ``data`` holds of the current frame's payload from ``start`` on."""
        take = min(self._remaining, len(data) - start)
        if take == 0 and self._remaining:
            return start  # only the header came: the payload goes on with the next read
        payload = data[start : start + take]
        self._remaining -= take
        last = self._remaining == 0
        fin = last and self._fin
        if self._message_opcode == TEXT:
            self._check_utf8(mask(payload, self._key) if self._key else payload, final=fin)
        run.append(_Piece(self._next_opcode, fin, payload, self._key, raw))
        self._next_opcode = CONTINUATION
        if self._key and not last:
            self._key = _rotate(self._key, take)
        if fin:
            self._message_opcode = 0
            self._message_size = 0
            self._utf8 = None
        return start + take

    def _check_utf8(self, text: bytes, *, final: bool) -> None:
        if self._utf8 is None:
            if text.isascii():
                return
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
        try:
            self._utf8.decode(text, final=final)
        except UnicodeDecodeError:
            raise FrameError(INVALID_PAYLOAD, "invalid UTF-8 in a text message") from None


def _join(run: list[_Piece]) -> bytes:
    """One frame for the pieces of one message: the first's opcode, the last's fin."""
    first = run[0]
    if len(run) == 1:
        if first.raw is not None:
            return first.raw
        header = frame_header(first.opcode, fin=first.fin, length=len(first.payload), key=first.key)
        return header + first.payload
    length = sum(len(piece.payload) for piece in run)
    if first.key:
        # Each piece's payload is masked with its own key: remask it with the first's,
        # rotated to where it lands (XOR with both keys at once).
        parts = []
        offset = 0
        for piece in run:
            key = bytes(a ^ b for a, b in zip(piece.key, _rotate(first.key, offset), strict=True))
            parts.append(mask(piece.payload, key) if any(key) else piece.payload)
            offset += len(piece.payload)
        payload = b"".join(parts)
    else:
        payload = b"".join(piece.payload for piece in run)
    header = frame_header(first.opcode, fin=run[-1].fin, length=length, key=first.key)
    return header + payload


def _read_close(payload: bytes) -> Close:
    """RFC 6455 §5.5.1, §7.1.5, §7.4."""
    if not payload:
        return Close(NO_STATUS, "")
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not (1000 <= code < 5000) or code in _LOCAL_ONLY or (code < 3000 and code not in _DEFINED):
        raise FrameError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_PAYLOAD, "close reason not UTF-8") from None
    return Close(code, reason)
