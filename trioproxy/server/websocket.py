"""WebSocket upgrades: the handshake on both sides, then the tunnel between them.

The proxy ends the WebSocket protocol on each of its sides (RFC 6455 §1.3,
§4): it answers the client's opening handshake with its own key and opens its
own WebSocket to the upstream, then relays messages between two wsproto
connections. That costs a parse of every frame, and buys what a byte pipe
cannot give: limits on message size, close codes that say which side did
what, and one place to enforce RFC 6455 against both peers.

Opening (deferred negotiation)::

    client ── GET, Upgrade: websocket ─► proxy
                                          │ balancer.pick() → target
                                          │ connect (502 / 504 on failure)
                                          ├── GET, Upgrade, the client's subprotocols,
                                          │   cookies, auth..., X-Forwarded-*, Via ─► upstream
                                          │ ◄── 101 with its chosen subprotocol
    client ◄── 101, that subprotocol ─────┘     (or 403 + body: relayed as plain HTTP)

Nothing is offered or accepted in ``Sec-WebSocket-Extensions`` on either
side, so frames carry plain payloads and the proxy may re-fragment them
(RFC 6455 §5.4: an intermediary may change fragmentation when no extension is
negotiated).

The tunnel runs one task per direction in one nursery. A task reads from its
side, feeds that side's wsproto connection and writes each event to the other
side before it reads again, so a slow reader slows the writer down through
the TCP windows and the proxy holds at most one read (64 KiB) and one frame
per direction: there is no queue to grow.

* Data frames are forwarded as they arrive: a message is never reassembled;
  what of it came in one read goes on as one frame (a large frame is split,
  a run of tiny fragments is joined), in one write; text stays UTF-8-checked
  (wsproto decodes it incrementally, and a message that is not UTF-8 fails
  with 1007, as an endpoint must).
* Ping and pong frames pass through with their payloads: a client's ping is
  answered by the upstream, so it measures the whole path, and the
  upstream's pings reach the client. Neither is answered by the proxy.
* A message over ``max_message_size`` fails with 1009 (RFC 6455 §7.4.1);
  its first part may have reached the other side already.
* The idle timeout (off by default) ends a tunnel in which no byte arrived
  from either side for that long.

Closing. A close frame is forwarded with its code and reason, and the other
side's answer is forwarded back, so both peers see the close handshake of
the other (RFC 6455 §5.5.1, §7). When it cannot be so, the proxy closes each
side itself; 1005 and 1006 are never sent (§7.4.1), and a side that closed
first is always answered with its own code:

==========================================  =========================  ==========================
what happened                               client gets                upstream gets
==========================================  =========================  ==========================
client sent a close frame                   the upstream's answer      that close
upstream sent a close frame                 that close                 the client's answer
client connection ended, no close frame     —                          1001 client went away
upstream connection ended, no close frame   1001 upstream went away    —
client broke RFC 6455 (bad frame, UTF-8)    then 1002 / 1007           first 1001 client error
upstream broke RFC 6455                     first 1011 upstream error  then 1002 / 1007
client message over the limit               then 1009                  first 1001
upstream message over the limit             first 1011                 then 1009
no byte either way for the idle timeout     1001 idle timeout          1001 idle timeout
proxy shutting down (after the grace)       1001 going away            1001 going away
close answer not back in ``CLOSE_TIMEOUT``  its own code               —
==========================================  =========================  ==========================

A side that broke the rules is read no more; the other side is told first,
and what it still sends (say, the echo of the last good message) goes on to
the culprit until its close answer, which is what the two would have seen
connected directly; then the culprit gets its code and, its frames being
unreadable, the end of our side of the TCP connection (RFC 6455 §7.1.7).

After closing a side itself the proxy waits up to ``CLOSE_REPLY_TIMEOUT`` for
that side's answer, so that its close frame is read before the TCP connection
ends. All of that cleanup is shielded: on shutdown the handler nursery's
deadline cancels the tunnel, which then sends its 1001s and returns.

Conformance: Autobahn|Testsuite's fuzzing client (cases 1-7 and 9: framing,
pings, reserved bits and opcodes, fragmentation, UTF-8, close handshake,
limits) passes all 300 cases through the proxy as it does against the
upstream directly (tests/e2e/test_websocket.py, opt-in).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from http import HTTPStatus
from typing import Any, Final, Protocol

import attrs
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from trioproxy.balance.target import Target
from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import (
    ClientDisconnected,
    NoHealthyUpstream,
    ProxyError,
    UpstreamBrokenMidBody,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from trioproxy.http.headers import (
    client_response_headers,
    get_all,
    get_first,
    has_token,
    new_request_id,
    request_id_from,
    upstream_request_headers,
)
from trioproxy.http.protocol import Headers, RequestHead, ResponseHead, ServerProtocol
from trioproxy.upstream.origin import UpstreamURL
from trioproxy.upstream.websocket import (
    HANDSHAKE_FIELDS,
    Accepted,
    Refused,
    UpstreamWebSocket,
    connect_upstream_websocket,
)

log = logging.getLogger("trioproxy.websocket")

READ_SIZE: Final = 65536
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: How long a forwarded close frame may wait for the other side's answer.
CLOSE_TIMEOUT = 5.0
#: How long the proxy waits for the answer to a close frame of its own.
CLOSE_REPLY_TIMEOUT = 1.0

_VIA: Final = b"1.1 trioproxy"
_PHRASES: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
_CloseFrame = tuple[int, str]


# --- the client's opening handshake ------------------------------------------------------


class BadWebSocketRequest(ProxyError):
    """An upgrade request that is not a valid opening handshake (RFC 6455 §4.2.1)."""

    status = 400
    reason = "invalid WebSocket handshake"


class WebSocketVersionNotSupported(ProxyError):
    """RFC 6455 §4.2.2: answer 426 naming the version we speak."""

    status = 426
    reason = "only WebSocket version 13 is supported"
    headers = ((b"sec-websocket-version", b"13"),)


def is_websocket_upgrade(head: RequestHead) -> bool:
    """Whether the request asks for a WebSocket (RFC 6455 §4.1 items 1, 5 and 6).

    Only a bodiless HTTP/1.1 GET with ``Upgrade: websocket`` and ``Connection:
    upgrade`` qualifies; anything else carrying an ``Upgrade`` is served as
    plain HTTP, the upgrade ignored (RFC 9110 §7.8 lets a server do so).
    """
    headers = head.headers
    return (
        head.method == b"GET"
        and head.http_version == b"1.1"
        and has_token(headers, b"upgrade", b"websocket")
        and has_token(headers, b"connection", b"upgrade")
        and get_first(headers, b"transfer-encoding") is None
        and get_first(headers, b"content-length") in (None, b"0")
    )


@attrs.frozen
class ClientHandshake:
    key: bytes
    subprotocols: list[str]


def parse_client_handshake(head: RequestHead) -> ClientHandshake:
    """The client's key and offered subprotocols.

    Raises:
        WebSocketVersionNotSupported: ``Sec-WebSocket-Version`` is not 13.
        BadWebSocketRequest: no valid ``Sec-WebSocket-Key``, or a subprotocol
            that is not ASCII.
    """
    if get_all(head.headers, b"sec-websocket-version") != [b"13"]:
        raise WebSocketVersionNotSupported("Sec-WebSocket-Version is not 13")
    keys = get_all(head.headers, b"sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise BadWebSocketRequest("missing or invalid Sec-WebSocket-Key")
    subprotocols: list[str] = []
    for value in get_all(head.headers, b"sec-websocket-protocol"):
        # Tokens, compared case-sensitively (RFC 6455 §4.1 item 10): not lowercased.
        for part in value.split(b","):
            token = part.strip(b" \t")
            if not token:
                continue
            if not token.isascii():
                raise BadWebSocketRequest("Sec-WebSocket-Protocol is not ASCII")
            subprotocols.append(token.decode("ascii"))
    return ClientHandshake(keys[0], subprotocols)


def _valid_key(key: bytes) -> bool:
    """A base64-encoded 16-byte value (RFC 6455 §4.1 item 7)."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


# --- the balancer, as the tunnel uses it ----------------------------------------------


class Balancing:
    """The engine's balancer and retry rules, as a tunnel uses them.

    The tunnel picks like the engine (``exclude`` for retries), reports the
    outcome of its handshake to the balancer (breaker and passive health), and
    counts an open tunnel in the target's ``inflight`` and ``tunnels`` for
    ``least_connections``. Connect failures are retried on other targets
    within the engine's ``retry.max_attempts`` and retry budget.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._balancer = engine.balancer
        engine.budget.record_request(trio.current_time())

    def pick(self, head: RequestHead, *, exclude: Sequence[Target] = ()) -> Target:
        """A target not in ``exclude`` (NoHealthyUpstream if none is left)."""
        return self._balancer.pick(head, now=trio.current_time(), exclude=exclude)

    def may_retry(self, *, attempts: int) -> bool:
        """Whether a connect failure may be tried again on another target."""
        if attempts >= self._engine.retry.max_attempts:
            return False
        budget = self._engine.budget
        now = trio.current_time()
        if not budget.can_retry(now):
            return False
        budget.record_retry(now)
        return True

    @staticmethod
    def url(target: Target) -> UpstreamURL:
        return target.url

    def track(self, target: Target, *, tunnel: bool = False) -> AbstractContextManager[None]:
        """Count a handshake (``tunnel=False``) or an open tunnel on ``target``."""
        return self._balancer.track(target, tunnel=tunnel)

    def report(self, target: Target, outcome: str, latency: float | None = None) -> None:
        """``outcome``: ``success``, ``failure`` (connect error, timeout, 5xx) or ``cancelled``."""
        now = trio.current_time()
        if outcome == "success":
            self._balancer.on_success(target, now, latency=latency)
        elif outcome == "failure":
            self._balancer.on_failure(target, now)
        else:
            self._balancer.on_cancelled(target, now)


# --- the upgrade ------------------------------------------------------------------------


class WebSocketDownstream(Protocol):
    """What the tunnel needs of the client connection (``ClientConnection``)."""

    client_addr: str
    scheme: str

    @property
    def stream(self) -> trio.abc.Stream: ...

    @property
    def protocol(self) -> ServerProtocol: ...

    async def receive_body(self) -> bytes: ...

    async def wait_disconnect(self) -> None: ...

    async def send_head(self, head: ResponseHead) -> None: ...

    async def send_body(self, data: bytes) -> None: ...

    async def send_end(self) -> None: ...


@attrs.frozen(kw_only=True)
class WebSocketSettings:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    idle_timeout: float | None = None


async def serve_websocket(
    head: RequestHead,
    downstream: WebSocketDownstream,
    record: ExchangeLog,
    *,
    engine: Engine,
    settings: WebSocketSettings,
) -> str | None:
    """Open the upstream WebSocket, accept the client, run the tunnel to its end.

    Returns:
        None when the upstream refused and its answer was relayed as an
        ordinary response (the connection may go on as HTTP); otherwise a
        note for the access log saying how the tunnel ended (the connection
        is done).

    Raises:
        ProxyError: before anything was sent to the client, for the handler to
            answer with its status (400/426 bad handshake, 502 connect error or
            invalid answer, 503 no target, 504 timeout); ClientDisconnected;
            UpstreamBrokenMidBody while relaying a refusal's body.
    """
    # Read to the request's end first (it has no body), so that a refusal
    # leaves the connection usable for the next request.
    if await downstream.receive_body():
        raise BadWebSocketRequest("WebSocket upgrade request with a body")
    handshake = parse_client_handshake(head)
    record.request_id = request_id_from(head.headers) or new_request_id()
    balancing = Balancing(engine)
    target, upstream = await _connect(head, balancing, engine, record)
    reported = False
    try:
        url = balancing.url(target)
        fields = upstream_request_headers(
            head.headers,
            client_addr=downstream.client_addr,
            scheme=downstream.scheme,
            upstream_host=url.origin.host_header,
            preserve_host=engine.preserve_host,
            request_id=record.request_id,
            via=_VIA,
        )
        host = get_first(fields, b"host") or url.origin.host_header
        upstream_target = url.upstream_target(head.target)
        if not (host.isascii() and upstream_target.isascii()):
            raise BadWebSocketRequest("non-ASCII Host or request-target in a WebSocket upgrade")
        started = trio.current_time()
        with balancing.track(target):
            answer = await _upstream_handshake(
                upstream,
                downstream,
                host=host,
                target=upstream_target,
                headers=[field for field in fields if field[0] not in HANDSHAKE_FIELDS],
                subprotocols=handshake.subprotocols,
                read_timeout=engine.read_timeout,
            )
        status = answer.status if isinstance(answer, Refused) else 101
        outcome = "failure" if status >= 500 else "success"
        balancing.report(target, outcome, trio.current_time() - started)
        reported = True
        record.status = status
        if isinstance(answer, Refused):
            await _relay_refusal(answer, upstream, downstream, record, engine.read_timeout)
            return None
        await _accept_client(downstream, handshake, answer, record)
        early = downstream.protocol.trailing_data()  # frames sent before our 101
        tunnel = Tunnel(
            downstream.stream,
            Connection(ConnectionType.SERVER, trailing_data=early),
            upstream.stream,
            answer.connection,
            max_message_size=settings.max_message_size,
            idle_timeout=settings.idle_timeout,
        )
        with balancing.track(target, tunnel=True):
            note = await tunnel.run()
        record.bytes_out = tunnel.upstream.bytes_in
        return f"websocket: {note}"
    except (UpstreamError, UpstreamTimeout):
        if not reported:
            balancing.report(target, "failure")
        raise
    except BaseException:
        if not reported:
            balancing.report(target, "cancelled")
        raise
    finally:
        await upstream.aclose()


async def _connect(
    head: RequestHead, balancing: Balancing, engine: Engine, record: ExchangeLog
) -> tuple[Target, UpstreamWebSocket]:
    """A target and a connection to it; a target that refuses the connection is
    left for another one, as the engine does: the upstream never saw the request.

    Raises:
        NoHealthyUpstream: no target to try.
        UpstreamConnectError, UpstreamConnectTimeout: the last target tried failed.
    """
    tried: list[Target] = []
    error: ProxyError | None = None
    while True:
        try:
            target = balancing.pick(head, exclude=tried)
        except NoHealthyUpstream:
            if error is None:
                raise
            raise error from None  # nothing else to try: the connect error stands
        tried.append(target)
        url = balancing.url(target)
        record.upstream = url.text
        try:
            return target, await connect_upstream_websocket(url.origin, engine.pool)
        except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
            balancing.report(target, "failure")
            if not balancing.may_retry(attempts=len(tried)):
                raise
            log.info("WebSocket upgrade to %s failed, trying another: %s", url.text, exc.detail)
            error = exc
        except BaseException:
            balancing.report(target, "cancelled")
            raise


async def _upstream_handshake(
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    **handshake: Any,
) -> Accepted | Refused:
    """The upstream's handshake, cancelled if the client leaves meanwhile."""
    answer: Accepted | Refused | None = None
    error: ProxyError | None = None
    client_gone = False

    async def watch_client(cancel_scope: trio.CancelScope) -> None:
        nonlocal client_gone
        try:
            await downstream.wait_disconnect()
        except ClientDisconnected:
            client_gone = True
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_client, nursery.cancel_scope)
        try:
            answer = await upstream.handshake(**handshake)
        except ProxyError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if client_gone:
        raise ClientDisconnected("client left during the upstream WebSocket handshake")
    if error is not None:
        raise error
    assert answer is not None
    return answer


async def _relay_refusal(
    answer: Refused,
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    record: ExchangeLog,
    read_timeout: float,
) -> None:
    """The upstream's non-101 answer, relayed as the response to the client's request."""
    headers = answer.headers
    if get_first(headers, b"transfer-encoding") is not None:
        # RFC 9112 §6.3 item 3, as for any response.
        headers = [field for field in headers if field[0] != b"content-length"]
    await downstream.send_head(
        ResponseHead(
            answer.status,
            client_response_headers(headers, request_id=record.request_id, via=_VIA),
            _PHRASES.get(answer.status, b""),
        )
    )
    if answer.has_body:
        try:
            while data := await upstream.receive_refusal_body(read_timeout):
                record.bytes_out += len(data)
                await downstream.send_body(data)
        except (UpstreamError, UpstreamTimeout) as exc:
            raise UpstreamBrokenMidBody(exc.detail) from None
    await downstream.send_end()


async def _accept_client(
    downstream: WebSocketDownstream,
    handshake: ClientHandshake,
    answer: Accepted,
    record: ExchangeLog,
) -> None:
    """The client's ``101``, with the upstream's subprotocol and other fields."""
    headers: Headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(handshake.key)),
    ]
    if answer.subprotocol is not None:
        headers.append((b"sec-websocket-protocol", answer.subprotocol.encode("ascii")))
    passed = [field for field in answer.headers if field[0] not in HANDSHAKE_FIELDS]
    headers += client_response_headers(passed, request_id=record.request_id, via=_VIA)
    data = downstream.protocol.send_informational(
        ResponseHead(101, headers, b"Switching Protocols")
    )
    try:
        await downstream.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ClientDisconnected(repr(exc)) from None


# --- the tunnel -------------------------------------------------------------------------


class _Gone(Exception):
    """A write to ``side`` failed: its connection is gone."""

    def __init__(self, side: _Side) -> None:
        self.side = side


_RELAYING = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)
_ANSWERABLE = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class _Side:
    """One peer of the tunnel: its stream and its wsproto connection."""

    __slots__ = (
        "broken",
        "bytes_in",
        "eof",
        "message_size",
        "messages_in",
        "name",
        "out",
        "owed_close",
        "parser_failed",
        "pump_scope",
        "reading",
        "received_close",
        "stream",
        "ws",
    )

    def __init__(self, name: str, stream: trio.abc.Stream, ws: Connection) -> None:
        self.name = name
        self.stream = stream
        self.ws = ws
        self.eof = False  # nothing more will be read
        self.broken = False  # nothing more can be written (a write failed or was cut)
        self.parser_failed = False  # wsproto refused its bytes: its frames are not read
        self.received_close: _CloseFrame | None = None
        #: It broke the protocol or a limit: the close it gets once the other side answered.
        self.owed_close: _CloseFrame | None = None
        self.message_size = 0  # bytes of the message being received so far
        self.messages_in = 0
        self.bytes_in = 0
        self.pump_scope: trio.CancelScope | None = None  # the task reading this side
        self.out: list[bytes] = []  # framed, not yet written
        self.reading = False  # that task waits for bytes (and writes nothing)

    async def receive(self) -> bytes | bytearray:
        """The next bytes; ``b""`` once the peer closed or reset the connection."""
        try:
            data = await self.stream.receive_some(READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
            data = b""
        if not data:
            self.eof = True
        return data

    def queue(self, event: Event) -> None:
        """Frame ``event`` for the next ``flush`` (wsproto's state moves now)."""
        self.out.append(self.ws.send(event))

    def queue_close(self, frame: _CloseFrame) -> None:
        self.queue(CloseConnection(code=frame[0], reason=frame[1]))

    async def flush(self) -> None:
        """Write what was queued, in one write.

        Raises:
            _Gone: the peer's connection is gone.
        """
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        # Until the write completes: one cut short (cancelled) leaves half a
        # frame on the wire, after which nothing else may be sent.
        self.broken = True
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _Gone(self) from None
        self.broken = False

    async def send_close(self, frame: _CloseFrame) -> None:
        self.queue_close(frame)
        await self.flush()


@attrs.frozen
class _Ending:
    note: str
    to_client: _CloseFrame = (CloseReason.GOING_AWAY, "going away")
    to_upstream: _CloseFrame = (CloseReason.GOING_AWAY, "going away")


_SHUTDOWN: Final = _Ending("proxy shutting down")
_IDLE: Final = _Ending(
    "idle timeout",
    to_client=(CloseReason.GOING_AWAY, "idle timeout"),
    to_upstream=(CloseReason.GOING_AWAY, "idle timeout"),
)
_CLOSE_TIMED_OUT: Final = _Ending("close handshake timed out")


class Tunnel:
    """Relays one WebSocket between a client and an upstream (see the module docstring).

    Resource handling: the streams belong to the caller, who closes them after
    ``run`` returns; ``run`` sends what close frames are owed first.
    """

    def __init__(
        self,
        client_stream: trio.abc.Stream,
        client_ws: Connection,
        upstream_stream: trio.abc.Stream,
        upstream_ws: Connection,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = None,
    ) -> None:
        self.client = _Side("client", client_stream, client_ws)
        self.upstream = _Side("upstream", upstream_stream, upstream_ws)
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.ending: _Ending | None = None
        self._relay_scope = trio.CancelScope()
        self._idle_scope = trio.CancelScope()
        self._first_close: str | None = None
        #: Set when a side broke the protocol or a limit: how the tunnel will end.
        self._failure: _Ending | None = None

    async def run(self) -> str:
        """Relay until the tunnel ends; return how it ended, for the log."""
        try:
            with self._idle_scope:
                self._touch()
                with self._relay_scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, self.client, self.upstream)
                        nursery.start_soon(self._pump, self.upstream, self.client)
                if self._relay_scope.cancelled_caught and self.ending is None:
                    self.ending = self._failure or _CLOSE_TIMED_OUT
            if self._idle_scope.cancelled_caught and self.ending is None:
                self.ending = _IDLE
        finally:
            # Also when cancelled from outside (shutdown): the peers are told.
            ending = self.ending or _SHUTDOWN
            with trio.CancelScope(shield=True):
                await self._finish(ending)
        return ending.note

    # -- relaying ------------------------------------------------------------------------

    def _touch(self) -> None:
        if self.idle_timeout is not None:
            self._idle_scope.deadline = trio.current_time() + self.idle_timeout

    def _end(self, ending: _Ending) -> None:
        """Stop relaying: reads stop now; a write under way may finish, briefly.

        Cutting a write short would leave half a frame on the wire and nothing
        more could be sent on that side, not even the close frame it is owed
        (or the last one of a close handshake, being written as it ends).
        """
        if self.ending is None:
            self.ending = self._failure or ending
        for side in (self.client, self.upstream):
            if side.reading and side.pump_scope is not None:
                side.pump_scope.cancel()
        deadline = trio.current_time() + CLOSE_REPLY_TIMEOUT
        if self._relay_scope.deadline > deadline:
            self._relay_scope.deadline = deadline

    def _closing(self) -> None:
        """A close is under way: the answer has CLOSE_TIMEOUT; idle time no longer counts."""
        if math.isinf(self._relay_scope.deadline):
            self._relay_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        self._idle_scope.deadline = math.inf

    async def _pump(self, src: _Side, dst: _Side) -> None:
        with trio.CancelScope() as src.pump_scope:
            try:
                await self._relay(src, dst)
            except _Gone as exc:
                self._end(self._went_away(exc.side))

    async def _relay(self, src: _Side, dst: _Side) -> None:
        """Forward ``src``'s events to ``dst`` until ``src`` has nothing more to say."""
        # What arrived with the handshake (trailing data) comes first.
        await self._forward_events(src, dst)
        while self.ending is None and src.owed_close is None:
            src.reading = True
            try:
                data = await src.receive()
            finally:
                src.reading = False
            if not data:
                if src.ws.state in _RELAYING:  # no close frame came first
                    self._end(self._went_away(src))
                return  # after its close frame: the other direction finishes
            self._touch()
            src.bytes_in += len(data)
            if src.ws.state not in _RELAYING:
                continue  # after its close frame, the rest is ignored (RFC 6455 §1.4)
            src.ws.receive_data(bytes(data))
            await self._forward_events(src, dst)

    async def _forward_events(self, src: _Side, dst: _Side) -> None:
        """Forward what ``src`` said in the bytes fed last, in one write to ``dst``.

        One write per read keeps memory to one read's worth, and the pieces
        of one message that arrived together go as one frame: a message sent
        in many tiny fragments costs the proxy one frame per read, not one
        per fragment.
        """
        message: list[str | bytes | bytearray] = []  # pieces of a message not yet queued
        kind: type[TextMessage] | type[BytesMessage] = BytesMessage
        for event in src.ws.events():
            if self.ending is not None or src.owed_close is not None:
                break
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._admit(event, src):
                    message.clear()  # over the limit: dst was sent a close instead
                    break
                if dst.ws.state is not ConnectionState.OPEN:
                    continue  # dst sent its close frame: no more data (RFC 6455 §5.5.1)
                message.append(event.data)
                kind = type(event)
                if event.message_finished:
                    _queue_data(dst, kind, message, finished=True)
                continue
            _queue_data(dst, kind, message, finished=False)
            if isinstance(event, CloseConnection):
                self._forward_close(event, src, dst)
            elif isinstance(event, (Ping, Pong)) and dst.ws.state is ConnectionState.OPEN:
                dst.queue(type(event)(payload=event.payload))
        _queue_data(dst, kind, message, finished=False)
        await dst.flush()

    def _admit(self, event: TextMessage | BytesMessage, src: _Side) -> bool:
        """Count a piece of ``src``'s message; False (and fail src) past the limit."""
        data = event.data
        if isinstance(data, str):
            # str.isascii() is O(1): the UTF-8 length is only counted when it differs.
            size = len(data) if data.isascii() else len(data.encode("utf-8"))
        else:
            size = len(data)
        src.message_size += size
        if src.message_size > self.max_message_size:
            self._fail(src, (CloseReason.MESSAGE_TOO_BIG, "message too big"))
            return False
        if event.message_finished:
            src.message_size = 0
            src.messages_in += 1
        return True

    def _forward_close(self, event: CloseConnection, src: _Side, dst: _Side) -> None:
        if src.ws.state in _RELAYING:
            # Not a close frame: wsproto refused src's bytes (RFC 6455 §7.1.7).
            src.parser_failed = True
            self._fail(src, (event.code, event.reason or ""))
            return
        src.received_close = (event.code, event.reason or "")
        if self._first_close is None:
            self._first_close = f"closed by {src.name}: {event.code} {event.reason or ''}"
        if dst.ws.state in _ANSWERABLE:
            # A side that broke the rules gets its own code, now that src answered.
            dst.queue_close(dst.owed_close or src.received_close)
        if self._failure is not None or (
            src.ws.state is ConnectionState.CLOSED and dst.ws.state is ConnectionState.CLOSED
        ):
            self._end(_Ending(self._first_close.rstrip()))
            return
        self._closing()

    def _fail(self, culprit: _Side, frame: _CloseFrame) -> None:
        """``culprit`` broke the protocol or a limit (RFC 6455 §7.1.7, §7.4.1).

        Nothing more is read from it. The other side is told first and what
        it still sends goes on to the culprit until its close answer, as if
        the two had been connected directly (an echo of the culprit's last
        good message still reaches it); then the culprit gets ``frame``.
        """
        culprit.owed_close = frame
        what = "message over the limit" if frame[0] == 1009 else f"broke the protocol ({frame[0]})"
        if culprit is self.client:
            other = self.upstream
            to_other: _CloseFrame = (
                CloseReason.GOING_AWAY,
                f"client {_SHORT.get(frame[0], 'error')}",
            )
            self._failure = _Ending(f"client {what}", to_client=frame, to_upstream=to_other)
        else:
            other = self.client
            to_other = (CloseReason.INTERNAL_ERROR, f"upstream {_SHORT.get(frame[0], 'error')}")
            self._failure = _Ending(f"upstream {what}", to_client=to_other, to_upstream=frame)
        if culprit.ws.state is not ConnectionState.OPEN or other.ws.state is not (
            ConnectionState.OPEN
        ):
            # A close handshake was already under way: nothing to wait for.
            self._end(self._failure)
            return
        other.queue_close(to_other)  # written by the culprit's task, the other's writer
        self._closing()

    # -- endings -------------------------------------------------------------------------

    def _went_away(self, side: _Side) -> _Ending:
        if side is self.client:
            return _Ending("client went away", to_upstream=(1001, "client went away"))
        return _Ending("upstream went away", to_client=(1001, "upstream went away"))

    async def _finish(self, ending: _Ending) -> None:
        """Send each side the close frame it is owed, then wait a little for answers."""
        with trio.move_on_after(CLOSE_REPLY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close, self.client, ending.to_client)
                nursery.start_soon(self._close, self.upstream, ending.to_upstream)

    async def _close(self, side: _Side, frame: _CloseFrame) -> None:
        state = side.ws.state
        if side.broken or (side.eof and state in _RELAYING):
            return  # gone, or cut mid-frame: only the TCP close is left
        if state is ConnectionState.REMOTE_CLOSING and side.received_close is not None:
            frame = side.received_close  # its own close is answered with its code
        elif side.owed_close is not None:
            frame = side.owed_close
        if state in _ANSWERABLE:
            try:
                await side.send_close(frame)
            except _Gone:
                return
        if side.eof:
            return
        if side.parser_failed:
            # Its frames cannot be read, so no answer will be: end our side
            # of the connection (RFC 6455 §7.1.7) and drain to the peer's end,
            # so that closing does not reset the connection under our frame.
            if isinstance(side.stream, trio.abc.HalfCloseableStream):
                try:
                    await side.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
            while await side.receive():
                pass
            return
        if side.ws.state is not ConnectionState.LOCAL_CLOSING:
            return
        # Its answer to our close, so that our frame is read before the
        # connection closes: closing a socket with unread data sends a reset.
        while data := await side.receive():
            side.ws.receive_data(bytes(data))
            if any(isinstance(event, CloseConnection) for event in side.ws.events()):
                return


_SHORT: Final = {1009: "message too big", 1007: "sent invalid UTF-8"}


def _queue_data(
    dst: _Side,
    kind: type[TextMessage] | type[BytesMessage],
    pieces: list[str | bytes | bytearray],
    *,
    finished: bool,
) -> None:
    """Queue the pieces of a message gathered so far as one frame (and forget them)."""
    if not pieces and not finished:
        return
    if kind is TextMessage:
        text = "".join(pieces)  # type: ignore[arg-type]
        pieces.clear()
        if text or finished:  # an empty piece (a partial UTF-8 sequence held back) says nothing
            dst.queue(TextMessage(data=text, message_finished=finished))
    else:
        data = b"".join(pieces)  # type: ignore[arg-type]
        pieces.clear()
        if data or finished:
            dst.queue(BytesMessage(data=data, message_finished=finished))
