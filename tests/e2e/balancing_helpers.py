"""Upstreams and a client for the balancing tests.

:class:`Upstream` is a small HTTP/1.1 keep-alive server (h11 over a trio listener on
127.0.0.1) that answers with its name and records every request it reads, with the
time it read it. It can be *killed* — its listener and every open connection closed,
as when its process dies — and started again on the same port. Some paths misbehave
on purpose (see :attr:`Upstream.routes`); probes from the proxy's health checker are
recognised by their ``User-Agent`` and recorded apart.

:class:`Client` is one keep-alive connection to the proxy with a minimal response
parser, fast enough to send thousands of requests per second from the test process
(the proxy's responses here always carry ``Content-Length``). A transport failure is
a :class:`Reply` with status 0, never an exception, so that load loops record it.

Times are ``trio.current_time()`` throughout: upstreams and clients share the test's
one trio run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import h11
import trio

PROBE_USER_AGENT = b"trioproxy-health"

#: How a path misbehaves: answer 503; read the request and close without a word; send
#: a 200 head and 10 of 1000 body bytes then close; wait for ``release`` then answer.
Route = Literal["503", "drop", "truncate", "hold"]


@attrs.frozen
class Seen:
    """A request as an upstream read it."""

    at: float
    method: str
    target: str
    probe: bool
    body: bytes = b""


@attrs.define(eq=False)
class Upstream:
    """A killable, restartable upstream; see the module docstring.

    Args:
        name: the body of every plain answer.
        delay: seconds to wait before answering anything, probes included.
        probe_delay: further seconds to wait before answering a probe.
        routes: path → misbehaviour.
        statuses: path → the status of every answer for it, probes included, as from
            a server with no route there (404) or one that cannot serve (503). The
            test may change it while the upstream runs.
        head_status: the status of every ``HEAD`` answer, as from a server that
            serves only ``GET`` (405).
    """

    name: str
    delay: float = 0.0
    probe_delay: float = 0.0
    routes: dict[str, Route] = attrs.Factory(dict)
    statuses: dict[str, int] = attrs.Factory(dict)
    head_status: int | None = None
    port: int = 0
    seen: list[Seen] = attrs.Factory(list)
    #: Requests waiting on a "hold" route right now.
    held: int = 0
    release: trio.Event = attrs.Factory(trio.Event)
    _scope: trio.CancelScope | None = None
    _nursery: trio.Nursery | None = None
    _stopped: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._scope is not None

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (on the same port as before, after a kill); ``nursery`` owns the server."""
        assert self._scope is None, f"{self.name} is already running"
        self._nursery = nursery
        self._stopped = trio.Event()
        await nursery.start(self._serve)

    async def restart(self) -> None:
        """Start again after :meth:`kill`, on the same port, in the same nursery."""
        assert self._nursery is not None, f"{self.name} was never started"
        await self.start(self._nursery)

    async def kill(self) -> None:
        """Close the listener and every connection; return once they are closed."""
        assert self._scope is not None, f"{self.name} is not running"
        self._scope.cancel()
        await self._stopped.wait()

    def requests(self, path: str | None = None, *, since: float = -math.inf) -> list[Seen]:
        """Requests from clients (not probes) read at or after ``since``."""
        return [
            s
            for s in self.seen
            if not s.probe and s.at >= since and (path is None or s.target == path)
        ]

    def probes(self) -> list[Seen]:
        return [s for s in self.seen if s.probe]

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # trio sets SO_REUSEADDR, so the port can be bound again while the connections
        # we closed sit in TIME_WAIT.
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as connections:
                    task_status.started()
                    await trio.serve_listeners(
                        self._connection, listeners, handler_nursery=connections
                    )
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._scope = None
            self._stopped.set()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(stream, conn)
                if request is None:
                    return
                if not await self._answer(stream, conn, request):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> Seen | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                probe = any(k == b"user-agent" and v == PROBE_USER_AGENT for k, v in head.headers)
                seen = Seen(
                    trio.current_time(),
                    head.method.decode(),
                    head.target.decode(),
                    probe,
                    bytes(body),
                )
                self.seen.append(seen)
                return seen
            else:  # ConnectionClosed
                return None

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, seen: Seen) -> bool:
        """Answer one request; False when the connection must end here."""
        if self.delay:
            await trio.sleep(self.delay)
        if seen.probe and self.probe_delay:
            await trio.sleep(self.probe_delay)
        route = None if seen.probe else self.routes.get(seen.target)
        if route == "drop":
            return False
        if route == "truncate":
            data = conn.send(h11.Response(status_code=200, headers=[("content-length", "1000")]))
            await stream.send_all((data or b"") + (conn.send(h11.Data(data=b"x" * 10)) or b""))
            return False
        if route == "hold":
            self.held += 1
            try:
                await self.release.wait()
            finally:
                self.held -= 1
        status, body = (503, b"busy " + self.name.encode()) if route == "503" else (200, b"")
        if seen.method == "HEAD" and self.head_status is not None:
            status = self.head_status
        elif seen.target in self.statuses:
            status = self.statuses[seen.target]
            body = b"%d from %s" % (status, self.name.encode())
        body = body or self.name.encode()
        headers = [("content-length", str(len(body))), ("x-upstream", self.name)]
        # One write per response: a kill (a cancellation) cannot cut one in half.
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if seen.method != "HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
        return True


async def start_upstreams(nursery: trio.Nursery, *names: str, **kwargs: object) -> list[Upstream]:
    upstreams = [Upstream(name, **kwargs) for name in names]  # type: ignore[arg-type]
    for upstream in upstreams:
        await upstream.start(nursery)
    return upstreams


def upstream_args(upstreams: Sequence[Upstream], *options: str) -> list[str]:
    """``--upstream URL[,option]`` for each, ``options[i]`` going with ``upstreams[i]``."""
    args: list[str] = []
    for i, upstream in enumerate(upstreams):
        option = options[i] if i < len(options) else ""
        args += ["--upstream", upstream.url + (f",{option}" if option else "")]
    return args


# --- the client -----------------------------------------------------------------------


@attrs.frozen
class Reply:
    """A response as the client read it; status 0 when the exchange broke off."""

    status: int
    headers: dict[str, str]
    body: bytes
    at: float = 0.0


class Client:
    """One keep-alive connection to ``host:port``, reopened when the proxy closes it."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
            self._stream = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, body: bytes = b"") -> Reply:
        head = f"{method} {path} HTTP/1.1\r\nHost: proxy.test\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + body
        with trio.move_on_after(self.timeout):
            try:
                return await self._exchange(data, method)
            except (OSError, trio.BrokenResourceError, EOFError):
                await self.aclose()
                return Reply(0, {}, b"broken", trio.current_time())
        await self.aclose()
        return Reply(0, {}, b"timeout", trio.current_time())

    async def get(self, path: str = "/who") -> Reply:
        return await self.request("GET", path)

    async def _exchange(self, data: bytes, method: str) -> Reply:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._buffer.clear()
        stream = self._stream
        await stream.send_all(data)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._fill(stream)
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if method == "HEAD" else int(headers["content-length"])
        while len(self._buffer) < length:
            await self._fill(stream)
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return Reply(status, headers, body, trio.current_time())

    async def _fill(self, stream: trio.SocketStream) -> None:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("the proxy closed the connection mid-response")
        self._buffer += chunk


async def run_load(
    host: str, port: int, *, total: int, concurrency: int, path: str = "/who"
) -> list[Reply]:
    """``total`` GETs of ``path`` over ``concurrency`` keep-alive connections, as fast as
    they go."""
    replies: list[Reply] = []
    remaining = [total]

    async def worker() -> None:
        async with Client(host, port) as client:
            while remaining[0] > 0:
                remaining[0] -= 1
                replies.append(await client.get(path))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return replies


def shares(replies: Sequence[Reply], names: Sequence[str]) -> dict[str, float]:
    """The share (0..1) of ``replies`` each upstream answered, by the body it sent."""
    total = len(replies)
    return {name: sum(1 for r in replies if r.body == name.encode()) / total for name in names}
