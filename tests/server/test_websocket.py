"""WebSocket upgrades and the tunnel (trioproxy/server/websocket.py), in memory.

Two levels, both over memory streams with ``autojump_clock`` (timeouts cost no real time):

* the :class:`Tunnel` alone, between two wsproto peers the test drives frame by frame:
  relaying, fragmentation, ping/pong, every way a tunnel can end, limits, backpressure;
* the whole upgrade through ``ClientConnection`` (``memory.start_proxy``) to a fake
  upstream that does wsproto's server handshake: deferred subprotocol negotiation, the
  headers that cross, refusals relayed as HTTP, failures answered with a status, bytes
  sent early on either side, and the balancer's counters. These run on both parsers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs
import memory
import pytest
import trio
import trio.testing
from memory import (
    FakeUpstream,
    Proxy,
    UpstreamPeer,
    fake_time_ceiling,  # noqa: F401  (autouse: fails a hung test fast)
    start_proxy,
)
from trio.testing import MockClock
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from trioproxy.http.protocol import RequestHead
from trioproxy.server.websocket import (
    CLOSE_REPLY_TIMEOUT,
    CLOSE_TIMEOUT,
    Tunnel,
    WebSocketSettings,
    is_websocket_upgrade,
)

# --- a test's WebSocket peer ---------------------------------------------------------------


class Peer:
    """The test's end of one WebSocket: a stream and a bare wsproto connection."""

    def __init__(
        self, stream: trio.abc.Stream, role: ConnectionType, trailing: bytes = b""
    ) -> None:
        self.stream = stream
        self.ws = Connection(role, trailing_data=trailing)
        self.events: deque[Event] = deque(self.ws.events())
        self.eof = False

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event | None:
        """The next event; None once the proxy closed the connection."""
        while not self.events:
            if self.eof:
                return None
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof = True
                continue
            if self.ws.state is not ConnectionState.CLOSED:
                self.ws.receive_data(data)
                self.events.extend(self.ws.events())
        return self.events.popleft()

    async def message(self) -> str | bytes:
        """The next whole message, its fragments joined."""
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event()
            assert isinstance(event, Message), f"expected a message, got {event!r}"
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]

    async def close_frame(self) -> tuple[int, str]:
        """Skip to the close frame the proxy sent; its (code, reason)."""
        while True:
            event = await self.next_event()
            assert event is not None, "the connection ended without a close frame"
            if isinstance(event, CloseConnection):
                return event.code, event.reason or ""

    async def answer_close(self) -> None:
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            await self.send(CloseConnection(code=1000))

    async def wait_eof(self) -> None:
        while await self.next_event() is not None:
            pass

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@attrs.define
class Wired:
    """A tunnel between a client peer and an upstream peer, running in the test's nursery."""

    client: Peer
    upstream: Peer
    tunnel: Tunnel
    done: trio.Event = attrs.Factory(trio.Event)
    note: str = ""
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)


def wire(
    nursery: trio.Nursery,
    *,
    lockstep: bool = False,
    client_early: bytes = b"",
    upstream_early: bytes = b"",
    max_message_size: int = 1 << 20,
    idle_timeout: float | None = None,
) -> Wired:
    """Start a tunnel over memory streams; ``*_early`` are bytes that came with the
    handshake (what ``trailing_data`` hands over)."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_end, proxy_client_end = pair()
    proxy_upstream_end, upstream_end = pair()
    tunnel = Tunnel(
        proxy_client_end,
        proxy_upstream_end,
        client_early=client_early,
        upstream_early=upstream_early,
        max_message_size=max_message_size,
        idle_timeout=idle_timeout,
    )
    wired = Wired(
        Peer(client_end, ConnectionType.CLIENT), Peer(upstream_end, ConnectionType.SERVER), tunnel
    )

    async def run() -> None:
        try:
            with wired.cancel_scope:
                wired.note = await tunnel.run()
        finally:
            # The owners of the streams close them once the tunnel is done.
            await trio.aclose_forcefully(proxy_client_end)
            await trio.aclose_forcefully(proxy_upstream_end)
            wired.done.set()

    nursery.start_soon(run)
    return wired


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """A client frame with an all-zero mask (so the payload goes as is)."""
    assert len(payload) < 126
    return bytes([first_byte, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


# --- relaying ------------------------------------------------------------------------------


async def test_text_and_binary_messages_cross_both_ways(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(TextMessage(data="héllo ✓"))
    assert await wired.upstream.message() == "héllo ✓"
    await wired.upstream.send(BytesMessage(data=bytes(range(256))))
    assert await wired.client.message() == bytes(range(256))
    await wired.client.send(TextMessage(data=""))
    assert await wired.upstream.message() == ""
    await wired.upstream.send(BytesMessage(data=b""))
    assert await wired.client.message() == b""


async def test_a_fragmented_message_arrives_whole_and_is_not_reassembled_first(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(TextMessage(data="frag", message_finished=False))
    # The first fragment is forwarded before the message ends.
    event = await wired.upstream.next_event()
    assert isinstance(event, TextMessage)
    assert (event.data, event.message_finished) == ("frag", False)
    await wired.client.send(TextMessage(data="ment€", message_finished=False))
    await wired.client.send(TextMessage(data="!", message_finished=True))
    pieces = [event.data]
    while not event.message_finished:
        event = await wired.upstream.next_event()
        assert isinstance(event, TextMessage)
        pieces.append(event.data)
    assert "".join(pieces) == "fragment€!"


async def test_a_large_message_streams_in_pieces(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    payload = bytes(range(256)) * 4096  # 1 MiB in one frame
    await wired.upstream.send(BytesMessage(data=payload))
    pieces = 0
    received = bytearray()
    while len(received) < len(payload):
        event = await wired.client.next_event()
        assert isinstance(event, BytesMessage)
        received += event.data
        pieces += 1
    assert received == payload
    assert event.message_finished


async def test_tiny_fragments_that_arrive_together_go_on_as_one_frame(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    fragments = b"".join(
        wired.client.ws.send(BytesMessage(data=b"%03d" % i, message_finished=i == 999))
        for i in range(1000)
    )
    await wired.client.send_raw(fragments)  # 1000 frames in one write
    frames = []
    while not frames or not frames[-1].message_finished:
        event = await wired.upstream.next_event()
        assert isinstance(event, BytesMessage)
        frames.append(event)
    assert b"".join(frame.data for frame in frames) == b"".join(b"%03d" % i for i in range(1000))
    assert len(frames) < 10


async def test_utf8_split_across_reads_is_forwarded_intact(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    frame = wired.client.ws.send(TextMessage(data="€" * 1000))
    for i in range(0, len(frame), 7):  # cut through multi-byte characters
        await wired.client.send_raw(frame[i : i + 7])
    assert await wired.upstream.message() == "€" * 1000


async def test_pings_and_pongs_pass_through(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(Ping(payload=b"client-ping"))
    assert await wired.upstream.next_event() == Ping(payload=b"client-ping")
    await wired.upstream.send(Pong(payload=b"client-ping"))
    assert await wired.client.next_event() == Pong(payload=b"client-ping")
    await wired.upstream.send(Ping(payload=b"up"))
    assert await wired.client.next_event() == Ping(payload=b"up")
    # A control frame between the fragments of a message.
    await wired.client.send(BytesMessage(data=b"a", message_finished=False))
    await wired.client.send(Ping(payload=b"mid"))
    await wired.client.send(BytesMessage(data=b"b", message_finished=True))
    assert await wired.upstream.next_event() == BytesMessage(data=b"a", message_finished=False)
    assert await wired.upstream.next_event() == Ping(payload=b"mid")
    assert await wired.upstream.message() == b"b"


async def test_bytes_that_came_with_the_handshakes_are_relayed_first(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    early_client = Connection(ConnectionType.CLIENT).send(TextMessage(data="sent early"))
    early_upstream = Connection(ConnectionType.SERVER).send(TextMessage(data="welcome"))
    wired = wire(nursery, client_early=early_client, upstream_early=early_upstream)
    assert await wired.upstream.message() == "sent early"
    assert await wired.client.message() == "welcome"


# --- closing -------------------------------------------------------------------------------


async def test_client_close_code_and_reason_reach_the_upstream_and_the_answer_comes_back(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(CloseConnection(code=4000, reason="bye now"))
    assert await wired.upstream.close_frame() == (4000, "bye now")
    await wired.upstream.send(CloseConnection(code=4000, reason="ok bye"))
    assert await wired.client.close_frame() == (4000, "ok bye")
    await wired.done.wait()
    assert wired.note == "closed by client: 4000 bye now"
    await wired.client.wait_eof()  # and the proxy closed the TCP connection


async def test_upstream_close_code_and_reason_reach_the_client(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.upstream.send(CloseConnection(code=1012, reason="restarting"))
    assert await wired.client.close_frame() == (1012, "restarting")
    await wired.client.send(CloseConnection(code=1012))
    assert (await wired.upstream.close_frame())[0] == 1012
    await wired.done.wait()
    assert wired.note.startswith("closed by upstream: 1012")


async def test_close_without_a_code_stays_without_one(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send_raw(masked_frame(0x88, b""))
    assert await wired.upstream.close_frame() == (1005, "")  # "no status received"
    await wired.upstream.send(CloseConnection(code=CloseReason.NO_STATUS_RCVD))  # empty
    assert await wired.client.close_frame() == (1005, "")


async def test_simultaneous_closes(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    wired = wire(nursery)
    await wired.client.send(CloseConnection(code=4001, reason="client"))
    await wired.upstream.send(CloseConnection(code=4002, reason="upstream"))
    assert await wired.upstream.close_frame() == (4001, "client")
    assert await wired.client.close_frame() == (4002, "upstream")
    await wired.done.wait()


async def test_data_after_the_upstream_closed_is_dropped(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    late = Connection(ConnectionType.CLIENT).send(TextMessage(data="too late"))
    await wired.upstream.send(CloseConnection(code=1000))
    assert await wired.client.close_frame() == (1000, "")
    # Sent before the client saw the close: it goes nowhere (the upstream sent its close).
    await wired.client.send_raw(late)
    await wired.client.send(CloseConnection(code=1000))
    event = await wired.upstream.next_event()
    assert isinstance(event, CloseConnection), event
    await wired.done.wait()


async def test_close_answer_that_never_comes_is_given_by_the_proxy(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    started = trio.current_time()
    await wired.client.send(CloseConnection(code=4003, reason="leaving"))
    assert await wired.upstream.close_frame() == (4003, "leaving")
    # The upstream never answers: after CLOSE_TIMEOUT the client gets its own code back.
    assert await wired.client.close_frame() == (4003, "leaving")
    assert trio.current_time() - started == pytest.approx(CLOSE_TIMEOUT)
    await wired.done.wait()
    assert wired.note == "close handshake timed out"


async def test_client_vanishing_closes_the_upstream_with_1001(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(TextMessage(data="hi"))
    assert await wired.upstream.message() == "hi"
    await wired.client.aclose()  # no close frame: the TCP connection just ends
    assert await wired.upstream.close_frame() == (1001, "client went away")
    await wired.upstream.answer_close()
    await wired.done.wait()
    assert wired.note == "client went away"


async def test_upstream_vanishing_closes_the_client_with_1001(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.upstream.aclose()
    assert await wired.client.close_frame() == (1001, "upstream went away")
    await wired.client.answer_close()
    await wired.done.wait()
    assert wired.note == "upstream went away"


async def test_upstream_vanishing_after_the_client_closed_answers_the_client(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(CloseConnection(code=4004, reason="done"))
    assert await wired.upstream.close_frame() == (4004, "done")
    await wired.upstream.aclose()  # a lazy server: no close answer, just gone
    assert await wired.client.close_frame() == (4004, "done")
    await wired.done.wait()


async def test_client_that_closes_tcp_right_after_its_close_frame(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(CloseConnection(code=1000))
    await wired.client.stream.send_eof()  # type: ignore[attr-defined]
    assert (await wired.upstream.close_frame())[0] == 1000
    await wired.upstream.send(CloseConnection(code=1000))
    await wired.done.wait()
    assert wired.note.startswith("closed by client: 1000")


# --- protocol errors and limits ----------------------------------------------------------------


async def test_invalid_utf8_from_the_client_is_1007(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send_raw(masked_frame(0x81, b"\xff\xfe"))
    # The upstream is told first, and answers...
    assert await wired.upstream.close_frame() == (1001, "client sent invalid UTF-8")
    await wired.upstream.answer_close()
    # ...then the client gets its code, and the proxy ends the TCP connection.
    code, _ = await wired.client.close_frame()
    assert code == 1007
    await wired.client.wait_eof()
    await wired.done.wait()
    assert wired.note == "client broke the protocol (1007)"


async def test_what_the_upstream_still_sends_reaches_a_client_that_broke_the_protocol(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """As if connected directly: an echo of the client's last good message, written by the
    upstream before it saw the close, still reaches the client before its 1002."""
    wired = wire(nursery)
    good = wired.client.ws.send(TextMessage(data="last good one"))
    await wired.client.send_raw(good + b"\x81\x02hi")  # then an unmasked frame
    assert await wired.upstream.message() == "last good one"
    assert await wired.upstream.close_frame() == (1001, "client error")
    # Written before it read the close (its wsproto would refuse it now).
    await wired.upstream.send_raw(
        Connection(ConnectionType.SERVER).send(TextMessage(data="last good one"))
    )
    await wired.upstream.answer_close()
    assert await wired.client.message() == "last good one"
    assert (await wired.client.close_frame())[0] == 1002


async def test_a_client_that_broke_the_protocol_gets_its_code_if_the_upstream_is_silent(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    started = trio.current_time()
    await wired.client.send_raw(b"\x81\x02hi")
    assert (await wired.client.close_frame())[0] == 1002
    assert trio.current_time() - started == pytest.approx(CLOSE_TIMEOUT)
    assert (await wired.upstream.close_frame())[0] == 1001


async def test_reserved_bits_from_the_upstream_is_1002_there_and_1011_to_the_client(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.upstream.send_raw(b"\xc1\x02hi")  # RSV1 set, no extension negotiated
    assert await wired.client.close_frame() == (1011, "upstream error")
    await wired.client.answer_close()
    assert (await wired.upstream.close_frame())[0] == 1002
    await wired.done.wait()
    assert wired.note == "upstream broke the protocol (1002)"


async def test_client_message_over_the_limit_is_1009(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery, max_message_size=1000)
    await wired.client.send(BytesMessage(data=b"x" * 1000))  # at the limit: fine
    assert await wired.upstream.message() == b"x" * 1000
    await wired.client.send(TextMessage(data="é" * 400, message_finished=False))  # 800 bytes
    await wired.client.send(TextMessage(data="é" * 101))  # 1002 bytes in all
    # The first part went on already.
    assert await wired.upstream.next_event() == TextMessage(data="é" * 400, message_finished=False)
    assert await wired.upstream.close_frame() == (1001, "client message too big")
    await wired.upstream.answer_close()
    assert await wired.client.close_frame() == (1009, "message too big")
    await wired.client.answer_close()
    await wired.done.wait()
    assert wired.note == "client message over the limit"


async def test_upstream_message_over_the_limit_is_1009_there_and_1011_to_the_client(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery, max_message_size=1000)
    await wired.upstream.send(BytesMessage(data=b"y" * 1001))
    assert await wired.client.close_frame() == (1011, "upstream message too big")
    await wired.client.answer_close()
    assert await wired.upstream.close_frame() == (1009, "message too big")


async def test_idle_timeout_closes_both_sides_with_1001(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery, idle_timeout=30)
    started = trio.current_time()
    await trio.sleep(20)
    await wired.client.send(Ping(payload=b"still here"))  # activity resets the clock
    assert isinstance(await wired.upstream.next_event(), Ping)
    assert await wired.client.close_frame() == (1001, "idle timeout")
    assert trio.current_time() - started == pytest.approx(50)
    assert await wired.upstream.close_frame() == (1001, "idle timeout")
    await wired.done.wait()
    assert wired.note == "idle timeout"


async def test_cancelled_from_outside_says_going_away_to_both(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    await wired.client.send(TextMessage(data="hi"))
    assert await wired.upstream.message() == "hi"
    wired.cancel_scope.cancel()  # what the handler nursery's deadline does on shutdown
    assert await wired.client.close_frame() == (1001, "going away")
    assert await wired.upstream.close_frame() == (1001, "going away")
    await wired.client.answer_close()
    await wired.upstream.answer_close()
    await wired.done.wait()


async def test_peers_that_never_answer_our_close_do_not_hold_the_tunnel(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    wired = wire(nursery)
    wired.cancel_scope.cancel()
    started = trio.current_time()
    await wired.done.wait()
    assert trio.current_time() - started == pytest.approx(CLOSE_REPLY_TIMEOUT)


async def test_a_slow_reader_holds_the_writer_back(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """Lockstep streams buffer nothing: if the proxy read ahead of the client, the
    upstream would get all its messages out while the client reads none."""
    wired = wire(nursery, lockstep=True)
    sent = 0

    async def upstream_sends() -> None:
        nonlocal sent
        for _ in range(100):
            await wired.upstream.send(BytesMessage(data=b"z" * 1000))
            sent += 1

    nursery.start_soon(upstream_sends)
    await trio.testing.wait_all_tasks_blocked()
    # One message in the proxy's hands (being written to the client), one being read.
    assert sent <= 2
    for _ in range(100):
        assert await wired.client.message() == b"z" * 1000
    await trio.testing.wait_all_tasks_blocked()
    assert sent == 100


# --- the upgrade, through the connection handler -------------------------------------------------


@pytest.fixture(params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Handler-level tests run over both implementations of the parser seam."""
    name: str = request.param
    monkeypatch.setattr(memory, "PARSER", name)
    return name


@attrs.define
class WsUpstream:
    """A fake upstream doing wsproto's server handshake, then running ``session``."""

    nursery: trio.Nursery
    #: Decides the handshake: an AcceptConnection or a RejectConnection (+ body).
    decide: Callable[[Request], AcceptConnection | tuple[RejectConnection, bytes]] = (
        lambda request: AcceptConnection()
    )
    #: Sent in the same write as the 101.
    greeting: bytes = b""
    requests: list[Request] = attrs.Factory(list)
    peers: list[Peer] = attrs.Factory(list)
    connected: trio.Event = attrs.Factory(trio.Event)
    closed: trio.Event = attrs.Factory(trio.Event)

    def fake(self) -> FakeUpstream:
        return FakeUpstream(self.nursery, self.handle)

    async def handle(self, peer: UpstreamPeer) -> None:
        self.connected.set()
        try:
            await self._handle(peer)
        finally:
            self.closed.set()

    async def _handle(self, peer: UpstreamPeer) -> None:
        handshake = H11Handshake(ConnectionType.SERVER)
        while True:
            data = await peer.receive_some()
            if not data:
                return
            try:
                handshake.receive_data(data)
            except RemoteProtocolError:  # not an upgrade: a plain answer
                await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                await peer.wait_for_eof()
                return
            requests = [e for e in handshake.events() if isinstance(e, Request)]
            if requests:
                break
        request = requests[0]
        self.requests.append(request)
        decision = self.decide(request)
        if isinstance(decision, tuple):
            reject, body = decision
            data = handshake.send(reject)
            if reject.has_body:
                data += handshake.send(RejectData(data=body))
            await peer.send(data)
            await peer.wait_for_eof()
            return
        await peer.send(handshake.send(decision) + self.greeting)
        ws_peer = Peer(peer.stream, ConnectionType.SERVER)
        self.peers.append(ws_peer)
        # Echo until the close handshake is over.
        while True:
            event = await ws_peer.next_event()
            if event is None:
                return
            if isinstance(event, Message):
                await ws_peer.send(event)
            elif isinstance(event, CloseConnection):
                await ws_peer.answer_close()


def upgrade_request(
    handshake: H11Handshake,
    *,
    subprotocols: list[str] | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    return handshake.send(
        Request(
            host="proxy.test",
            target="/chat?room=1",
            subprotocols=subprotocols or [],
            extra_headers=extra or [],
        )
    )


async def client_handshake(
    proxy: Proxy, data: bytes, handshake: H11Handshake
) -> tuple[memory.MemoryClient, list[Event]]:
    """Send ``data`` (an upgrade request, maybe more) and read the answer's events."""
    client = proxy.connect()
    await client.send_raw(data)
    events: list[Event] = []
    while not (events and _answered(events[-1])):
        chunk = await client._receive()
        handshake.receive_data(chunk or None)
        events.extend(handshake.events())
        if not chunk:
            break
    return client, events


def _answered(event: Event) -> bool:
    """The last event of a handshake's answer: the 101, or the refusal's end."""
    if isinstance(event, RejectConnection):
        return not event.has_body
    if isinstance(event, RejectData):
        return event.body_finished
    return isinstance(event, AcceptConnection)


@pytest.mark.usefixtures("parser")
async def test_upgrade_negotiates_the_upstreams_subprotocol_and_forwards_headers(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = WsUpstream(
        nursery,
        decide=lambda request: AcceptConnection(
            subprotocol=request.subprotocols[1], extra_headers=[(b"set-cookie", b"s=1")]
        ),
    )
    proxy = start_proxy(nursery, upstream.fake())
    handshake = H11Handshake(ConnectionType.CLIENT)
    request = upgrade_request(
        handshake,
        subprotocols=["chat.v1", "chat.v2"],
        extra=[
            (b"cookie", b"session=abc"),
            (b"authorization", b"Bearer t0k"),
            (b"origin", b"https://app.test"),
            (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
            (b"x-forwarded-for", b"10.0.0.1"),
        ],
    )
    client, events = await client_handshake(proxy, request, handshake)
    accept = events[-1]
    assert isinstance(accept, AcceptConnection), events
    assert accept.subprotocol == "chat.v2"
    assert accept.extensions == []  # no permessage-deflate on the client's side
    headers = dict(accept.extra_headers)
    assert headers[b"set-cookie"] == b"s=1"
    assert headers[b"via"] == b"1.1 trioproxy"
    request_id = headers[b"x-request-id"]

    seen = upstream.requests[0]
    assert seen.target == "/chat?room=1"
    assert seen.subprotocols == ["chat.v1", "chat.v2"]
    assert seen.extensions == []  # nor on the upstream's
    sent = dict(seen.extra_headers)
    assert sent[b"cookie"] == b"session=abc"
    assert sent[b"authorization"] == b"Bearer t0k"
    assert sent[b"origin"] == b"https://app.test"
    assert sent[b"x-forwarded-for"] == b"10.0.0.1, unknown"
    assert sent[b"x-forwarded-proto"] == b"http"
    assert sent[b"x-forwarded-host"] == b"proxy.test"
    assert sent[b"via"] == b"1.1 trioproxy"
    assert sent[b"x-request-id"] == request_id
    assert seen.host == "up.test"

    # And the tunnel works.
    ws = handshake.connection
    assert ws is not None
    peer = Peer(client.stream, ConnectionType.CLIENT)
    peer.ws = ws
    await peer.send(TextMessage(data="ping?"))
    assert await peer.message() == "ping?"
    await peer.send(CloseConnection(code=1000, reason="bye"))
    assert await peer.close_frame() == (1000, "")  # the upstream's answer
    await client.served.wait()


@pytest.mark.usefixtures("parser")
async def test_upgrade_with_frames_in_the_same_write_and_a_greeting_with_the_101(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    greeting = Connection(ConnectionType.SERVER).send(TextMessage(data="welcome"))
    upstream = WsUpstream(nursery, greeting=greeting)
    proxy = start_proxy(nursery, upstream.fake())
    handshake = H11Handshake(ConnectionType.CLIENT)
    early = Connection(ConnectionType.CLIENT).send(TextMessage(data="eager"))
    client, events = await client_handshake(proxy, upgrade_request(handshake) + early, handshake)
    assert isinstance(events[-1], AcceptConnection), events
    peer = Peer(client.stream, ConnectionType.CLIENT)
    assert handshake.connection is not None
    peer.ws = handshake.connection
    peer.events.extend(peer.ws.events())
    assert await peer.message() == "welcome"
    assert await peer.message() == "eager"  # echoed: it crossed as a frame, not as HTTP


@pytest.mark.usefixtures("parser")
async def test_refused_handshake_is_relayed_as_http_and_the_connection_goes_on(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    forbidden = RejectConnection(
        status_code=403,
        headers=[(b"content-type", b"text/plain"), (b"content-length", b"9")],
        has_body=True,
    )
    upstream = WsUpstream(nursery, decide=lambda request: (forbidden, b"go away!\n"))
    proxy = start_proxy(nursery, upstream.fake())
    client = proxy.connect()
    await client.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    # The client's parser did not send that request: read the answer raw.
    assert await client.read_raw_response_body() == b"go away!\n"
    # Still HTTP: a plain request on the same connection goes through the engine.
    await client.send_raw(b"GET /plain HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert await client.read_raw_response_body() == b"plain"


@pytest.mark.usefixtures("parser")
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", 426),
        (b"Sec-WebSocket-Version: 13\r\n", 400),
        (b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n", 400),
    ],
    ids=["version", "no-key", "short-key"],
)
async def test_invalid_client_handshake_is_refused(
    nursery: trio.Nursery, headers: bytes, status: int, autojump_clock: MockClock
) -> None:
    upstream = WsUpstream(nursery)
    proxy = start_proxy(nursery, upstream.fake())
    client = proxy.connect()
    await client.send_raw(
        b"GET /ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + headers
        + b"\r\n"
    )
    raw = await client.read_raw_response_body()
    assert raw is not None and raw.startswith(str(status).encode())
    assert not upstream.connected.is_set()
    # The request was read whole: the connection goes on.
    await client.send_raw(b"GET /plain HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert await client.read_raw_response_body() == b"plain"


@pytest.mark.usefixtures("parser")
async def test_connect_refused_is_502(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, refuse=True))
    handshake = H11Handshake(ConnectionType.CLIENT)
    _, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 502


@pytest.mark.usefixtures("parser")
async def test_upstream_that_never_answers_is_504(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def silent(peer: UpstreamPeer) -> None:
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, silent), read_timeout=30)
    handshake = H11Handshake(ConnectionType.CLIENT)
    started = trio.current_time()
    _, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 504
    assert trio.current_time() - started == pytest.approx(30)


@pytest.mark.usefixtures("parser")
async def test_upstream_answering_http_200_is_relayed(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def plain(peer: UpstreamPeer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, plain))
    handshake = H11Handshake(ConnectionType.CLIENT)
    _, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 200
    assert b"".join(e.data for e in events if isinstance(e, RejectData)) == b"plain"


@pytest.mark.usefixtures("parser")
async def test_bad_accept_key_from_the_upstream_is_502(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def liar(peer: UpstreamPeer) -> None:
        await peer.read_head()
        await peer.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
        )
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, liar))
    handshake = H11Handshake(ConnectionType.CLIENT)
    _, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[0], RejectConnection)
    assert events[0].status_code == 502


@pytest.mark.usefixtures("parser")
async def test_client_leaving_during_the_upstream_handshake_closes_the_upstream(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    head_received = trio.Event()

    async def slow(peer: UpstreamPeer) -> None:
        await peer.read_head()
        head_received.set()
        await peer.wait_for_eof()

    upstream = FakeUpstream(nursery, slow)
    proxy = start_proxy(nursery, upstream)
    client = proxy.connect()
    await client.send_raw(upgrade_request(H11Handshake(ConnectionType.CLIENT)))
    await head_received.wait()
    await client.aclose()
    await upstream.peers[0].closed_by_proxy.wait()
    await client.served.wait()


@pytest.mark.usefixtures("parser")
async def test_an_upgrade_not_taken_up_leaves_the_pipelined_request_intact(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """An h2c upgrade is served as plain HTTP; what followed it in the same write (held
    unparsed while the upgrade was pending) is the next request."""

    async def echo_target(request: memory.ReceivedRequest) -> memory.Reply:
        return memory.ok(request.target)

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_target))
    client = proxy.connect()
    await client.send_raw(
        b"GET /first HTTP/1.1\r\nHost: p\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings"
        b"\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: p\r\n\r\n"
    )
    assert await client.read_raw_response_body() == b"/first"
    assert await client.read_raw_response_body() == b"/second"
    first = proxy.upstream.requests[0]
    assert first.header(b"upgrade") is None
    assert first.header(b"http2-settings") is None  # named by Connection: hop-by-hop


@pytest.mark.usefixtures("parser")
async def test_tunnel_settings_apply(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    upstream = WsUpstream(nursery)
    proxy = start_proxy(nursery, upstream.fake())
    proxy.state.websocket = WebSocketSettings(max_message_size=10)
    handshake = H11Handshake(ConnectionType.CLIENT)
    client, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[-1], AcceptConnection)
    peer = Peer(client.stream, ConnectionType.CLIENT)
    assert handshake.connection is not None
    peer.ws = handshake.connection
    await peer.send(BytesMessage(data=b"x" * 11))
    assert await peer.close_frame() == (1009, "message too big")


@pytest.mark.usefixtures("parser")
async def test_the_tunnel_is_counted_on_its_target(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = WsUpstream(nursery)
    proxy = start_proxy(nursery, upstream.fake())
    target = proxy.group.balancer.targets[0]
    handshake = H11Handshake(ConnectionType.CLIENT)
    client, events = await client_handshake(proxy, upgrade_request(handshake), handshake)
    assert isinstance(events[-1], AcceptConnection)
    await trio.testing.wait_all_tasks_blocked()
    assert (getattr(target, "tunnels", 1), getattr(target, "inflight", 1)) == (1, 1)
    peer = Peer(client.stream, ConnectionType.CLIENT)
    assert handshake.connection is not None
    peer.ws = handshake.connection
    await peer.send(CloseConnection(code=1000))
    await peer.close_frame()
    await client.served.wait()
    assert (getattr(target, "tunnels", 0), getattr(target, "inflight", 0)) == (0, 0)


# --- sans-I/O helpers --------------------------------------------------------------------------


def head(
    *headers: tuple[bytes, bytes], method: bytes = b"GET", version: bytes = b"1.1"
) -> RequestHead:
    return RequestHead(method, b"/ws", [(b"host", b"p"), *headers], version)


UPGRADE = ((b"upgrade", b"websocket"), (b"connection", b"keep-alive, Upgrade"))


async def test_is_websocket_upgrade(autojump_clock: MockClock) -> None:
    assert is_websocket_upgrade(head(*UPGRADE))
    assert is_websocket_upgrade(head((b"upgrade", b"WebSocket"), (b"connection", b"upgrade")))
    assert not is_websocket_upgrade(head(*UPGRADE, method=b"POST"))
    assert not is_websocket_upgrade(head(*UPGRADE, version=b"1.0"))
    assert not is_websocket_upgrade(head((b"upgrade", b"h2c"), (b"connection", b"upgrade")))
    assert not is_websocket_upgrade(head((b"upgrade", b"websocket")))
    assert not is_websocket_upgrade(head(*UPGRADE, (b"content-length", b"3")))
    assert is_websocket_upgrade(head(*UPGRADE, (b"content-length", b"0")))
    assert not is_websocket_upgrade(head(*UPGRADE, (b"transfer-encoding", b"chunked")))
