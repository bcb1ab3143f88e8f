"""The frame reader of the WebSocket tunnel (trioproxy/server/ws_frames.py), sans-I/O.

Frames are built by hand here and what the reader hands on is decoded by wsproto, an
independent implementation: whatever the reader passes on must be valid frames carrying
the same payload.
"""

from __future__ import annotations

import os
import struct

import pytest
from frames import KEY, frame
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage

from trioproxy.server.ws_frames import Close, FrameReader


def decoded(data: bytes, *, masked: bool = True) -> list[object]:
    """wsproto's reading of frames a client (``masked``) or a server sent."""
    reader = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    reader.receive_data(data)
    return list(reader.events())


def message_of(events: list[object]) -> bytes:
    data = b""
    for event in events:
        assert isinstance(event, Message), event
        data += event.data.encode() if isinstance(event.data, str) else event.data
    assert isinstance(events[-1], Message) and events[-1].message_finished
    return data


def feed_all(reader: FrameReader, *chunks: bytes) -> bytes:
    out = b""
    for chunk in chunks:
        for item in reader.feed(chunk):
            assert isinstance(item, bytes), item
            out += item
    assert reader.error is None
    return out


def test_whole_frames_go_on_as_they_came() -> None:
    reader = FrameReader(masked=True, max_message_size=1 << 20)
    frames = frame(0x1, b"hello") + frame(0x9, b"ping") + frame(0x2, os.urandom(300))
    assert b"".join(reader.feed(frames)) == frames  # type: ignore[arg-type]


@pytest.mark.parametrize("masked", [True, False])
def test_a_frame_cut_across_reads_goes_on_as_valid_pieces(masked: bool) -> None:
    payload = os.urandom(200_003)
    data = frame(0x2, payload, key=KEY if masked else None)
    reader = FrameReader(masked=masked, max_message_size=1 << 20)
    # Cuts at odd places: the pieces' keys are the client's, rotated.
    out = feed_all(reader, *(data[i : i + 4099] for i in range(0, len(data), 4099)))
    events = decoded(out, masked=masked)
    assert len(events) > 1
    assert message_of(events) == payload


def test_tiny_fragments_in_one_read_are_joined_under_one_key() -> None:
    keys = [os.urandom(4) for _ in range(50)]
    data = b"".join(
        frame(0x1 if i == 0 else 0x0, b"%02d" % i + b"\xc3", fin=False, key=keys[i])
        + frame(0x0, b"\xa9", fin=i == 49, key=keys[i][::-1])
        for i in range(50)
    )
    reader = FrameReader(masked=True, max_message_size=1 << 20)
    out = feed_all(reader, data)
    events = decoded(out)
    assert len(events) == 1
    assert isinstance(events[0], TextMessage)
    assert events[0].data == "".join(f"{i:02d}é" for i in range(50))


def test_a_control_frame_between_fragments_keeps_its_place() -> None:
    data = frame(0x2, b"ab", fin=False) + frame(0x9, b"mid") + frame(0x0, b"cd")
    reader = FrameReader(masked=True, max_message_size=1 << 20)
    events = decoded(feed_all(reader, data[:7], data[7:]))  # cut after "a"
    assert events[-2:] == [
        Ping(payload=b"mid"),
        BytesMessage(data=b"cd", frame_finished=True, message_finished=True),
    ]
    assert message_of([*events[:-2], events[-1]]) == b"abcd"


def test_a_close_frame_is_read_and_what_follows_is_not() -> None:
    data = frame(0x1, b"last") + frame(0x8, struct.pack("!H", 4000) + b"bye") + frame(0x1, b"x")
    reader = FrameReader(masked=True, max_message_size=1 << 20)
    items = reader.feed(data)
    assert items == [frame(0x1, b"last"), Close(4000, "bye")]
    assert reader.closed
    assert reader.feed(frame(0x1, b"more")) == []


def test_the_size_limit_is_known_from_the_header() -> None:
    reader = FrameReader(masked=False, max_message_size=100)
    items = reader.feed(frame(0x2, b"x" * 60, fin=False, key=None) + b"\x80")  # half a header
    assert reader.error is None
    # The header's second byte says 41 more bytes: 101 in all, before any of them came.
    items += reader.feed(b"\x29")
    assert reader.error is not None and reader.error.code == 1009
    assert decoded(b"".join(items), masked=False) == [
        BytesMessage(data=b"x" * 60, frame_finished=True, message_finished=False)
    ]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(0x1, b"hi", rsv=0x40), 1002),
        (frame(0x3, b"hi"), 1002),
        (frame(0x1, b"hi", key=None), 1002),
        (frame(0x9, b"p" * 126), 1002),
        (frame(0x9, b"p", fin=False), 1002),
        (frame(0x0, b"orphan"), 1002),
        (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
        (frame(0x1, b"\xe2\x82", fin=False) + frame(0x0, b"!"), 1007),
        (frame(0x1, b"\xe2\x82"), 1007),
        (frame(0x8, b"\x03"), 1002),
        (frame(0x8, struct.pack("!H", 1005)), 1002),
        (frame(0x8, struct.pack("!H", 2000)), 1002),
        (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),
        (bytes((0x82, 0xFE, 0, 5)) + KEY + b"hello", 1002),  # 2-byte length for 5
    ],
    ids=[
        "rsv1",
        "opcode-3",
        "unmasked",
        "long-ping",
        "fragmented-ping",
        "orphan-continuation",
        "new-message-mid-message",
        "utf8-cut-short",
        "utf8-truncated",
        "close-1-byte",
        "close-1005",
        "close-reserved-code",
        "close-reason-not-utf8",
        "non-minimal-length",
    ],
)
def test_rule_breaking_frames_stop_the_reader_with_their_code(data: bytes, code: int) -> None:
    reader = FrameReader(masked=True, max_message_size=1 << 20)
    reader.feed(data)
    assert reader.error is not None
    assert reader.error.code == code
    assert reader.feed(frame(0x1, b"after")) == []


def test_the_proxys_own_close_to_the_upstream_is_masked() -> None:
    from trioproxy.server.ws_frames import close_frame

    events = decoded(close_frame(1001, "going away", masked=True))
    assert events == [CloseConnection(code=1001, reason="going away")]
    assert decoded(close_frame(1005, "", masked=False), masked=False) == [
        CloseConnection(code=1005, reason="")
    ]
