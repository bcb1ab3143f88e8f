"""The bench's own back ends: ``python -m bench.servers KIND --port N``.

``http``
    Fixed bodies, like the nginx back end: ``/small`` (100 bytes, also as ``/v1/small``),
    ``/1m`` (1 MiB),
    ``/upload`` (reads the whole request body, then answers ``ok``), ``/ready``. Used by
    ``--smoke`` so that it needs no nginx.
``sse``
    ``/sse`` is an endless ``text/event-stream`` (and so is a ``POST`` to
    ``.../v1/chat/completions``, whose events are OpenAI chat completion chunks).
    Every ``--interval`` seconds one event is written to every open stream in a
    burst (fan-out), each carrying the ``time.monotonic_ns()`` of its own write, so
    a client on the same machine can tell the latency from the upstream write to
    its own read (CLOCK_MONOTONIC is system-wide). A bare selector loop, not trio:
    see :func:`serve_sse`.
``ws``
    A WebSocket echo server (wsproto) on any path; a request that is not an upgrade gets
    a plain ``200 ok`` (that is the readiness probe).

Each answers ``/ready`` and ``/`` (GET or HEAD: a proxy's health check) with 200, and
prints ``listening on http://127.0.0.1:PORT`` once bound. Streams end after
``MAX_STREAM_SECONDS`` so that nothing runs unbounded.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import time
from functools import partial

import httptools
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

SMALL_BODY = b"x" * 99 + b"\n"
MIB_BODY = b"y" * (1 << 20)
MAX_STREAM_SECONDS = 600.0
READ_SIZE = 1 << 16

# "/" for the health checks a proxy may make (trioproxy: HEAD / by default);
# "/v1/small" for the route of bench/gateway.py, which rewrites /shop/small to it.
_BODIES = {
    b"/small": SMALL_BODY,
    b"/v1/small": SMALL_BODY,
    b"/1m": MIB_BODY,
    b"/ready": b"ok\n",
    b"/": b"ok\n",
}


def _response(status: int, body: bytes, *, close: bool = False, head_only: bool = False) -> bytes:
    """A response with a Content-Length; ``head_only`` for a HEAD request (RFC 9110 §9.3.2:
    the same header fields, no content)."""
    reason = {200: b"OK", 404: b"Not Found"}.get(status, b"")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n" % (
        status,
        reason,
        len(body),
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


class _RequestReader:
    """httptools callbacks for one connection: collects the target and the body length."""

    def __init__(self) -> None:
        self.url = b""
        self.complete = False
        self.body_bytes = 0
        self.keep_alive = False
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        # llhttp's answer for the message being parsed; False once it is complete.
        self.keep_alive = self.parser.should_keep_alive()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def _serve_fixed(stream: trio.SocketStream) -> None:
    reader = _RequestReader()
    try:
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                return
            reader.parser.feed_data(data)
            if not reader.complete:
                continue
            path = reader.url.split(b"?", 1)[0]
            if path == b"/upload":
                body = b"ok\n"
            else:
                body = _BODIES.get(path, b"")
            keep_alive = reader.keep_alive
            status = 200 if path == b"/upload" or path in _BODIES else 404
            head_only = reader.parser.get_method() == b"HEAD"
            await stream.send_all(
                _response(status, body, close=not keep_alive, head_only=head_only)
            )
            if not keep_alive:
                return
            reader.url = b""
            reader.complete = False
            reader.body_bytes = 0
    except (trio.BrokenResourceError, httptools.HttpParserError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk or len(data) > 65536:
            return b""
        data += chunk
    return data


class _SseStream:
    """One client connection of the SSE server."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.head = b""
        self.streaming = False
        self.pending = bytearray()
        self.opened = now
        #: Events are OpenAI chat completion chunks (``POST .../v1/chat/completions``).
        self.openai = False


def serve_sse(port: int, interval: float) -> None:
    """The SSE back end, on a bare selector loop rather than trio.

    A fan-out writes to every stream in one burst; the client that times it shares this
    core, so the shorter the burst the lower the floor under every latency measured.
    A plain ``send`` per socket keeps the burst to a few microseconds per stream.
    """
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    streams: dict[socket.socket, _SseStream] = {}
    seq = 0
    next_tick = time.monotonic() + interval

    def close(conn: _SseStream) -> None:
        streams.pop(conn.sock, None)
        sel.unregister(conn.sock)
        conn.sock.close()

    def send(conn: _SseStream, data: bytes) -> None:
        if conn.pending:
            conn.pending += data  # a slow reader: keep its order, write when it can
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            close(conn)
            return
        if sent < len(data):
            conn.pending += data[sent:]
            sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    while True:
        timeout = max(0.0, next_tick - time.monotonic())
        for key, mask in sel.select(timeout):
            if key.data is None:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = _SseStream(sock, time.monotonic())
                    sel.register(sock, selectors.EVENT_READ, conn)
                    streams[sock] = conn
                continue
            conn = key.data
            if mask & selectors.EVENT_WRITE:
                try:
                    sent = conn.sock.send(conn.pending)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(conn)
                    continue
                del conn.pending[:sent]
                if not conn.pending:
                    sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(conn)
                    continue
                if conn.streaming:
                    continue
                conn.head += data
                if b"\r\n\r\n" not in conn.head:
                    if len(conn.head) > 65536:
                        close(conn)
                    continue
                if conn.head.startswith(b"GET /sse"):
                    conn.streaming = True
                    send(conn, _SSE_HEAD)
                elif (
                    conn.head.startswith(b"POST ")
                    and b"/v1/chat/completions " in (conn.head.split(b"\r\n", 1)[0])
                ):
                    # An OpenAI-style token stream (the request body is not read).
                    conn.streaming = conn.openai = True
                    send(conn, _SSE_HEAD)
                else:
                    head_only = conn.head.startswith(b"HEAD ")
                    send(conn, _response(200, b"ok\n", close=True, head_only=head_only))
                    if conn.sock in streams:
                        close(conn)
        now = time.monotonic()
        if now < next_tick:
            continue
        seq += 1
        next_tick += interval
        for conn in list(streams.values()):
            if not conn.streaming:
                continue
            if now - conn.opened > MAX_STREAM_SECONDS:
                send(conn, b"0\r\n\r\n")
                if conn.sock in streams:
                    close(conn)
                continue
            if conn.openai:
                event = _OPENAI_EVENT % (seq, time.monotonic_ns())
            else:
                event = b"data: %d %d\n\n" % (seq, time.monotonic_ns())
            send(conn, b"%x\r\n%s\r\n" % (len(event), event))


#: A chat completion chunk carrying one token, with the sequence number and the
#: monotonic time of its write in ``bench`` (the load generator reads them there).
_OPENAI_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":" token"},"finish_reason":null}],'
    b'"bench":"%d %d"}\n\n'
)

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def _serve_ws(stream: trio.SocketStream) -> None:
    try:
        head = await _read_head(stream)
        if not head:
            return
        if b"upgrade: websocket" not in head.lower():
            head_only = head.startswith(b"HEAD ")
            await stream.send_all(_response(200, b"ok\n", close=True, head_only=head_only))
            return
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head)
        with trio.move_on_after(MAX_STREAM_SECONDS):
            while True:
                out = b""
                closing = False
                for event in ws.events():
                    if isinstance(event, Request):
                        out += ws.send(AcceptConnection())
                    elif isinstance(event, TextMessage | BytesMessage):
                        out += ws.send(event)
                    elif isinstance(event, Ping):
                        out += ws.send(event.response())
                    elif isinstance(event, CloseConnection):
                        out += ws.send(event.response())
                        closing = True
                if out:
                    await stream.send_all(out)
                if closing:
                    return
                data = await stream.receive_some(READ_SIZE)
                ws.receive_data(data or None)
                if not data:
                    return
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve(kind: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        handler = _serve_ws if kind == "ws" else _serve_fixed
        listeners = await nursery.start(
            partial(trio.serve_tcp, handler, port, host="127.0.0.1", backlog=4096)
        )
        bound = listeners[0].socket.getsockname()[1]
        print(f"listening on http://127.0.0.1:{bound}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=("http", "sse", "ws"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.5, help="SSE tick (s)")
    args = parser.parse_args()
    try:
        if args.kind == "sse":
            serve_sse(args.port, args.interval)
        else:
            trio.run(serve, args.kind, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
