"""The bench's own load generators, for what wrk cannot do or is not there for.

* :func:`http_load`: N keep-alive connections sending the same request in a loop (the
  smoke run's generator; wrk does the throughput scenarios of a full run);
* :func:`open_idle`: N connections that each make one request and are then held open;
* :func:`sse_fanout`: N concurrent event streams, timing each event from the upstream's
  write (the timestamp it carries) to our read (a bare selector loop; the rest is trio);
* :func:`ws_echo`: N WebSocket connections each doing echo round trips back to back.

Responses are parsed with httptools (llhttp), which also undoes chunked framing, so a
proxy may reframe a body without the client noticing. Every generator is bounded: by its
``duration`` and by explicit timeouts on connecting and on the first answer.

Errors are counted, never swallowed: the caller turns a non-zero count into a failed
measurement (see ``bench.scenarios``).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable

import attrs
import httptools
import trio

from bench.stats import percentile

READ_SIZE = 1 << 16
HOST = "127.0.0.1"

# What a peer can do to a connection, as this client sees it.
_IO_ERRORS = (OSError, trio.BrokenResourceError, httptools.HttpParserError, ConnectionError)


@attrs.define
class _Tally:
    requests: int = 0
    non_2xx: int = 0
    errors: int = 0
    body_bytes: int = 0
    first_error: str = ""
    latencies: list[float] = attrs.field(factory=list)

    def error(self, what: BaseException | str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what if isinstance(what, str) else f"{type(what).__name__}: {what}"


@attrs.frozen
class HttpLoad:
    requests: int
    non_2xx: int
    socket_errors: int
    body_bytes: int
    duration: float
    p50_ms: float
    p99_ms: float
    first_error: str

    @property
    def req_s(self) -> float:
        return self.requests / self.duration

    @property
    def mib_s(self) -> float:
        return self.body_bytes / self.duration / (1 << 20)


class _Response:
    """httptools callbacks for one response at a time on a keep-alive connection."""

    def __init__(self) -> None:
        self.complete = False
        self.body_bytes = 0
        self.on_body_data: Callable[[bytes], None] | None = None
        self.headers_done = False
        self.keep_alive = False
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        # llhttp answers should_keep_alive() for the message being parsed; once it is
        # complete the answer is always False, so read it here.
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.on_body_data is not None:
            self.on_body_data(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _request(method: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: bench\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def _exchange(stream: trio.SocketStream, request: bytes, response: _Response) -> None:
    response.complete = False
    response.headers_done = False
    response.body_bytes = 0
    await stream.send_all(request)
    while not response.complete:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            raise ConnectionError("connection closed before the response ended")
        response.parser.feed_data(data)


async def http_load(
    port: int,
    path: str,
    *,
    connections: int,
    duration: float,
    method: str = "GET",
    body: bytes = b"",
) -> HttpLoad:
    """``connections`` keep-alive connections, each sending requests back to back for
    ``duration`` seconds; a request still in flight at the end is not counted."""
    request = _request(method, path, body)
    tally = _Tally()

    async def connection() -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream(HOST, port)
            except OSError as exc:
                tally.error(exc)
                await trio.sleep(0.01)
                continue
            try:
                response = _Response()
                while True:
                    started = time.perf_counter()
                    await _exchange(stream, request, response)
                    tally.latencies.append(time.perf_counter() - started)
                    tally.requests += 1
                    tally.body_bytes += response.body_bytes
                    if not 200 <= response.status < 300:
                        tally.non_2xx += 1
                    if not response.keep_alive:
                        break
            except _IO_ERRORS as exc:
                tally.error(exc)
            finally:
                await trio.aclose_forcefully(stream)

    started = time.perf_counter()
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(connection)
    elapsed = time.perf_counter() - started
    return HttpLoad(
        requests=tally.requests,
        non_2xx=tally.non_2xx,
        socket_errors=tally.errors,
        body_bytes=tally.body_bytes,
        duration=elapsed,
        p50_ms=percentile(tally.latencies, 50) * 1e3,
        p99_ms=percentile(tally.latencies, 99) * 1e3,
        first_error=tally.first_error,
    )


@attrs.frozen
class IdleConnections:
    streams: list[trio.SocketStream]
    #: Connections whose request was answered.
    answered: int
    errors: int
    non_2xx: int
    first_error: str
    seconds: float
    #: No request was answered for ``stall_s``: the server stopped taking connections.
    stalled: bool


async def open_idle(
    port: int,
    count: int,
    *,
    path: str = "/small",
    concurrency: int = 200,
    within: float = 90.0,
    stall_s: float = 15.0,
) -> IdleConnections:
    """Open ``count`` connections, make one request on each, and keep them open.

    Gives up after ``within`` seconds in all, or as soon as no request was answered for
    ``stall_s`` seconds (a server that caps its connections leaves the rest waiting in
    its listen backlog, unanswered).

    Resource handling:
        The caller owns the returned streams and must close them (:func:`close_all`),
        also when it fails.
    """
    request = _request("GET", path, b"")
    tally = _Tally()
    streams: list[trio.SocketStream] = []
    limit = trio.Semaphore(concurrency)
    answered = 0
    stalled = False

    async def one() -> None:
        nonlocal answered
        async with limit:
            try:
                stream = await trio.open_tcp_stream(HOST, port)
            except OSError as exc:
                tally.error(exc)
                return
            streams.append(stream)
            try:
                response = _Response()
                await _exchange(stream, request, response)
                answered += 1
                if not 200 <= response.status < 300:
                    tally.non_2xx += 1
            except _IO_ERRORS as exc:
                tally.error(exc)

    async def watchdog(scope: trio.CancelScope) -> None:
        nonlocal stalled
        seen, since = answered, trio.current_time()
        while True:
            await trio.sleep(0.5)
            if answered != seen:
                seen, since = answered, trio.current_time()
            elif trio.current_time() - since > stall_s:
                stalled = True
                scope.cancel()
                return

    started = time.perf_counter()
    with trio.move_on_after(within) as scope:
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog, outer.cancel_scope)
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(one)
            outer.cancel_scope.cancel()
    if scope.cancelled_caught:
        tally.error(f"timed out after {within:.0f} s opening {count} connections")
    return IdleConnections(
        streams,
        answered,
        tally.errors,
        tally.non_2xx,
        tally.first_error,
        time.perf_counter() - started,
        stalled,
    )


#: ``SO_LINGER`` on, timeout 0: ``close`` sends an RST and leaves no TIME_WAIT behind.
_LINGER_RESET = struct.pack("ii", 1, 0)


async def close_all(streams: list[trio.SocketStream]) -> None:
    """Close ``streams`` with an RST rather than a FIN.

    A FIN from this side would leave every one of them in TIME_WAIT for 60 s: 10k per
    idle measurement, reaped by the kernel during whichever scenarios run a minute
    later. Nothing is lost: the connections are idle, between requests.
    """
    for stream in streams:
        try:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already reset by the peer: closing it leaves nothing behind either
        await trio.aclose_forcefully(stream)
    streams.clear()


@attrs.frozen
class SseFanout:
    streams: int
    ready: int
    events: int
    errors: int
    duration: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    first_error: str

    @property
    def events_s(self) -> float:
        return self.events / self.duration


class _SseClient:
    """One event stream of :func:`sse_fanout`: a non-blocking socket and its parser."""

    def __init__(self, sock: socket.socket, on_event: Callable[[bytes, int], None]) -> None:
        self.sock = sock
        self.on_event = on_event
        self.buffer = b""
        self.seen_event = False
        self.counted = False
        self.sent = False
        self.response = _Response()
        self.response.on_body_data = self.on_body

    def on_body(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buffer += data
        while b"\n\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n\n", 1)
            self.seen_event = True
            self.on_event(raw, now)


def sse_fanout(
    port: int,
    *,
    streams: int,
    duration: float,
    path: str = "/sse",
    ready_timeout: float = 20.0,
    on_start: Callable[[], None] | None = None,
    method: str = "GET",
    body: bytes = b"",
) -> SseFanout:
    """Open ``streams`` event streams; once each has had its first event, time every
    event for ``duration`` seconds.

    A stream that has no first event within ``ready_timeout`` (a proxy that buffers the
    response) leaves ``ready < streams``; the caller decides what that means.
    ``on_start`` is called when the timing starts (to start a CPU clock).

    A bare selector loop rather than trio: a burst of 1000 events must be drained fast,
    on the core the SSE back end also uses, or the client's own delay is what is timed.
    """
    request = _request(method, path, body)
    tally = _Tally()
    ready = 0
    recording = False
    events = 0

    def on_event(raw: bytes, now: int) -> None:
        nonlocal events
        if raw.startswith(b"data: {"):  # an OpenAI chunk: the stamp is in "bench"
            raw = raw.rpartition(b'"bench":"')[2].rstrip(b'"}')
        fields = raw.removeprefix(b"data: ").split()
        if recording and len(fields) == 2:
            events += 1
            tally.latencies.append((now - int(fields[1])) / 1e6)

    sel = selectors.DefaultSelector()
    clients: list[_SseClient] = []

    def drop(client: _SseClient, why: BaseException | str) -> None:
        tally.error(why)
        sel.unregister(client.sock)
        client.sock.close()
        clients.remove(client)

    try:
        for _ in range(streams):
            sock = socket.socket()
            sock.setblocking(False)
            err = sock.connect_ex((HOST, port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                tally.error(OSError(err, os.strerror(err)))
                continue
            client = _SseClient(sock, on_event)
            clients.append(client)
            sel.register(sock, selectors.EVENT_WRITE, client)
        ready_deadline = time.monotonic() + ready_timeout
        started = end = 0.0
        while True:
            now = time.monotonic()
            if not recording and ready == streams and not end:
                if on_start is not None:
                    on_start()
                started, end = now, now + duration
                recording = True
            if recording and now >= end:
                break
            if not recording and now >= ready_deadline:
                break
            if not clients:
                break
            for key, mask in sel.select(0.1):
                client = key.data
                if mask & selectors.EVENT_WRITE and not client.sent:
                    err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        drop(client, OSError(err, os.strerror(err)))
                        continue
                    try:
                        client.sock.send(request)  # tiny: fits any empty send buffer
                    except OSError as exc:
                        drop(client, exc)
                        continue
                    client.sent = True
                    sel.modify(client.sock, selectors.EVENT_READ, client)
                    continue
                try:
                    data = client.sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    drop(client, exc)
                    continue
                if not data:
                    drop(client, ConnectionError("stream closed by the server"))
                    continue
                try:
                    client.response.parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    drop(client, exc)
                    continue
                if client.response.headers_done and client.response.status != 200:
                    tally.non_2xx += 1
                    drop(client, f"status {client.response.status}")
                    continue
                if client.seen_event and not client.counted:
                    client.counted = True
                    ready += 1
        elapsed = time.monotonic() - started if recording else 0.0
    finally:
        for client in clients:
            client.sock.close()
        sel.close()
    lat = tally.latencies
    return SseFanout(
        streams=streams,
        ready=ready,
        events=events,
        errors=tally.errors,
        duration=elapsed or 1.0,
        p50_ms=percentile(lat, 50),
        p99_ms=percentile(lat, 99),
        max_ms=max(lat) if lat else float("nan"),
        first_error=tally.first_error,
    )


@attrs.frozen
class WsEcho:
    connections: int
    connected: int
    messages: int
    errors: int
    duration: float
    p50_ms: float
    p99_ms: float
    first_error: str
    #: The proxy refused the upgrade: its status, or 0 when it did not refuse.
    refused_status: int

    @property
    def msgs_s(self) -> float:
        return self.messages / self.duration


async def ws_echo(
    port: int,
    *,
    connections: int,
    duration: float,
    path: str = "/ws",
    size: int = 64,
    connect_timeout: float = 10.0,
    on_start: Callable[[], None] | None = None,
) -> WsEcho:
    """``connections`` WebSocket connections, each sending a ``size``-byte text message
    and waiting for its echo, back to back, for ``duration`` seconds."""
    from trio_websocket import (
        ConnectionClosed,
        ConnectionRejected,
        HandshakeError,
        open_websocket,
    )

    payload = "m" * size
    tally = _Tally()
    refused = 0
    connected = 0
    attempted = 0
    handshakes_done = trio.Event()
    go = trio.Event()

    def handshake_over(ok: bool) -> None:
        nonlocal connected, attempted
        connected += ok
        attempted += 1
        if attempted == connections:
            handshakes_done.set()

    async def one() -> None:
        nonlocal refused
        shaken = False
        try:
            async with open_websocket(
                HOST,
                port,
                path,
                use_ssl=False,
                connect_timeout=connect_timeout,
                disconnect_timeout=1.0,
            ) as ws:
                shaken = True
                handshake_over(True)
                await go.wait()
                while True:
                    started = time.perf_counter()
                    await ws.send_message(payload)
                    echo = await ws.get_message()
                    if echo != payload:
                        tally.error("echo differs from the message sent")
                        return
                    tally.latencies.append(time.perf_counter() - started)
                    tally.requests += 1
        except ConnectionRejected as exc:
            refused = exc.status_code
        except (HandshakeError, ConnectionClosed, *_IO_ERRORS) as exc:
            tally.error(exc)
        finally:
            if not shaken:
                handshake_over(False)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(one)
        with trio.move_on_after(connect_timeout + 1):
            await handshakes_done.wait()
        if connected == connections:
            if on_start is not None:
                on_start()
            started = time.perf_counter()
            go.set()
            await trio.sleep(duration)
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    return WsEcho(
        connections=connections,
        connected=connected,
        messages=tally.requests,
        errors=tally.errors,
        duration=elapsed,
        p50_ms=percentile(tally.latencies, 50) * 1e3,
        p99_ms=percentile(tally.latencies, 99) * 1e3,
        first_error=tally.first_error,
        refused_status=refused,
    )
