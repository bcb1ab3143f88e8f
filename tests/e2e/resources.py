"""What the streaming, leak and shutdown tests share: outside measurements of the proxy
process, a raw HTTP/1.1 client, and raw upstreams that record what they saw.

The proxy is measured from outside, as an operator would: :class:`RssMonitor` samples
its resident set size every ~50 ms in a thread (so a busy test loop cannot stretch the
interval), :func:`wait_for_fds` polls its open file descriptors (``psutil``).

The upstreams are bare trio TCP servers (``fixtures.serve_tcp_handler``): they send the
``upstream_app`` pattern as fast as the socket takes it, which hypercorn cannot quite do
for a gigabyte, and they note the moment the proxy closes each connection, which no
ASGI server tells its application. Times are ``trio.current_time()`` on both sides: the
client and the upstreams run in the test's one trio run, so their clocks agree.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import psutil
import trio
from fixtures import StreamHandler, reset
from upstream_app import CHUNK_SIZE, pattern_bytes, pattern_sha256

MiB = 1 << 20
GiB = 1 << 30
#: The acceptance ceiling for the proxy's resident set size: 100 MB (not MiB).
RSS_LIMIT = 100_000_000

#: One full chunk of the pattern; a run of them is the pattern itself.
PATTERN_CHUNK = pattern_bytes(CHUNK_SIZE)

READ_SIZE = 64 * 1024


@functools.cache
def pattern_digest(n: int) -> str:
    """``pattern_sha256(n)``, computed once per size per test session."""
    return pattern_sha256(n)


# --- measuring the proxy process -------------------------------------------------------


class RssMonitor:
    """Sample a process's RSS every ``interval`` seconds while the ``with`` block runs.

    A thread does the sampling, so the figures do not depend on how busy the test's trio
    loop is. A sample is taken on entry and on exit as well.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> RssMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._sample():
                return

    def _sample(self) -> bool:
        try:
            rss = self.process.memory_info().rss
        except psutil.Error:  # the process exited: nothing more to measure
            return False
        self.samples.append((time.monotonic(), rss))
        return True

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)

    @property
    def first(self) -> int:
        return self.samples[0][1]

    @property
    def max_gap(self) -> float:
        """The longest time between two samples, to show the sampling was real."""
        times = [t for t, _ in self.samples]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def summary(self) -> str:
        return (
            f"RSS start {self.first / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB "
            f"({len(self.samples)} samples, max gap {self.max_gap * 1000:.0f} ms)"
        )


def fd_count(pid: int) -> int:
    count: int = psutil.Process(pid).num_fds()
    return count


async def wait_for_fds(pid: int, target: Callable[[], int], *, within: float) -> int:
    """Poll the open fds of ``pid`` until they equal ``target()``, for up to ``within`` s.

    ``target`` is re-read at every poll (it may depend on what an upstream still holds
    open). Returns the last count seen, equal or not, for the test to assert on.
    """
    deadline = trio.current_time() + within
    while True:
        count = fd_count(pid)
        if count == target() or trio.current_time() >= deadline:
            return count
        await trio.sleep(0.05)


def connections_to(pid: int, port: int) -> int:
    """How many TCP connections ``pid`` has open to ``port`` on 127.0.0.1."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port
    )


async def wait_until(predicate: Callable[[], bool], *, within: float) -> bool:
    """Poll ``predicate`` every 10 ms for up to ``within`` seconds; return its last value."""
    deadline = trio.current_time() + within
    while not predicate():
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(0.01)
    return True


# --- a raw client -------------------------------------------------------------------------


@attrs.frozen
class Head:
    """A parsed response head: status, headers (names lower-cased, last value wins)."""

    status: int
    headers: dict[bytes, bytes]


async def open_request(host: str, port: int, head: bytes) -> trio.SocketStream:
    """Connect and send ``head`` (a whole request head, or head and body start)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(head)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def receive_head(stream: trio.abc.ReceiveStream) -> tuple[Head, bytes]:
    """Read a response head; return it and the body bytes that came with it."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        assert len(buffer) < 65536, f"response head too long: {bytes(buffer[:200])!r}"
        data = await stream.receive_some(READ_SIZE)
        assert data, f"EOF before a whole response head: {bytes(buffer)!r}"
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return Head(int(status_line.split(b" ")[1]), headers), rest


async def receive_body_digest(
    stream: trio.abc.ReceiveStream, length: int, first: bytes = b""
) -> tuple[int, str]:
    """Read a ``Content-Length`` body in 64 KiB reads, hashing as it comes.

    ``first`` is what came with the head. Returns the bytes received and their hex
    SHA-256; fewer than ``length`` if the peer closed early.
    """
    digest = hashlib.sha256(first)
    received = len(first)
    while received < length:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            break
        digest.update(data)
        received += len(data)
    return received, digest.hexdigest()


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> tuple[bytes, str]:
    """Read to the end; return the bytes and how it ended: ``"eof"`` or ``"reset"``."""
    received = bytearray()
    try:
        while data := await stream.receive_some(READ_SIZE):
            received += data
    except trio.BrokenResourceError:
        return bytes(received), "reset"
    return bytes(received), "eof"


# --- raw upstreams ----------------------------------------------------------------------


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d OK" % status, *(name + b": " + value for name, value in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def send_pattern(
    stream: trio.abc.SendStream, n: int, counter: list[int] | None = None
) -> None:
    """Send ``pattern_bytes(n)`` in 64 KiB writes; add each write to ``counter[0]``."""
    remaining = n
    while remaining:
        chunk = PATTERN_CHUNK if remaining >= CHUNK_SIZE else PATTERN_CHUNK[:remaining]
        await stream.send_all(chunk)
        remaining -= len(chunk)
        if counter is not None:
            counter[0] += len(chunk)


def pattern_upstream(n: int, counter: list[int] | None = None) -> StreamHandler:
    """A handler answering any one request with 200 and ``pattern_bytes(n)``
    (``Content-Length``), as fast as the socket takes it."""

    async def handler(stream: trio.SocketStream) -> None:
        await _read_request_head(stream, bytearray())
        await stream.send_all(response_head(200, [(b"content-length", str(n).encode())]))
        await send_pattern(stream, n, counter)

    return handler


async def _read_request_head(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    """The next request head from ``stream`` (bytes kept in ``buffer`` across calls);
    None on EOF before one."""
    while (end := buffer.find(b"\r\n\r\n")) == -1:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return None
        buffer += data
    head = bytes(buffer[: end + 4])
    del buffer[: end + 4]
    return head


@attrs.define
class UpstreamRecord:
    """What a :func:`recording_upstream` saw. Keys are request-targets; times are
    ``trio.current_time()``."""

    accepted: int = 0
    open: int = 0
    #: Connections idle after a whole ``/ok`` response, waiting for the next request:
    #: the proxy's pooled keep-alive connections, which may legitimately stay open.
    idle_keepalive: int = 0
    received: dict[str, float] = attrs.Factory(dict)
    #: When the proxy's side of the connection that carried this request was seen to
    #: close (EOF or reset, on read or write).
    closed: dict[str, float] = attrs.Factory(dict)
    #: When the upstream itself ended the connection (``/half``, ``/half-rst``).
    hung_up: dict[str, float] = attrs.Factory(dict)
    body_bytes: dict[str, int] = attrs.Factory(dict)


#: ``/big`` bodies: far more than any test reads.
BIG_BODY = 256 * MiB
#: ``/half`` announces this much and sends :data:`HALF_SENT` of it before hanging up.
HALF_LENGTH = 10 * MiB
HALF_SENT = 1 * MiB


def recording_upstream(record: UpstreamRecord) -> StreamHandler:
    """A raw upstream that behaves by path and records each connection's fate.

    Paths (a further ``/anything`` suffix makes each target unique):

    ``/ok``        200, ``hello``, keep-alive: the next request may follow.
    ``/big``       200 with ``Content-Length`` :data:`BIG_BODY`, sent until the proxy
                   closes the connection.
    ``/think``     no answer at all; waits (up to 60 s) for the proxy to close.
    ``/drop``      closes without answering (the proxy owes the client a 502).
    ``/garbage``   answers with something that is not HTTP (502).
    ``/half``      announces :data:`HALF_LENGTH` bytes, sends :data:`HALF_SENT`, closes;
                   ``/half-rst`` resets instead; a ``/chunked`` suffix sends the body
                   chunked (and never the last chunk).
    """

    async def handler(stream: trio.SocketStream) -> None:
        record.accepted += 1
        record.open += 1
        buffer = bytearray()
        target = ""
        keep_alive = False
        try:
            while True:
                # After a whole /ok answer the connection idles here, in the proxy's pool.
                record.idle_keepalive += keep_alive
                try:
                    head = await _read_request_head(stream, buffer)
                finally:
                    record.idle_keepalive -= keep_alive
                if head is None:
                    _closed(record, target)
                    return
                target = head.split(b" ", 2)[1].decode("latin-1")
                record.received[target] = trio.current_time()
                keep_alive = await _answer(stream, target, record)
                if not keep_alive:
                    return
        except (trio.BrokenResourceError, OSError):
            _closed(record, target)
        finally:
            record.open -= 1

    return handler


def _closed(record: UpstreamRecord, target: str) -> None:
    if target:
        record.closed.setdefault(target, trio.current_time())


async def _answer(stream: trio.SocketStream, target: str, record: UpstreamRecord) -> bool:
    """Answer one request; True if the connection may carry another."""
    kind = target.split("/")[1]
    if kind == "ok":
        await stream.send_all(response_head(200, [(b"content-length", b"5")]) + b"hello")
        return True
    if kind == "big":
        head = response_head(200, [(b"content-length", str(BIG_BODY).encode())])
        await _until_closed(stream, target, record, head, BIG_BODY)
        return False
    if kind == "think":
        with trio.move_on_after(60):
            await _until_closed(stream, target, record, b"", 0)
        return False
    if kind == "drop":
        return False
    if kind == "garbage":
        await stream.send_all(b"this is not HTTP\r\n\r\n")
        await _until_closed(stream, target, record, b"", 0)
        return False
    if kind in ("half", "half-rst"):
        if target.endswith("/chunked"):
            head = response_head(200, [(b"transfer-encoding", b"chunked")])
            sent = 0
            await stream.send_all(head)
            while sent < HALF_SENT:
                await stream.send_all(b"%x\r\n" % CHUNK_SIZE + PATTERN_CHUNK + b"\r\n")
                sent += CHUNK_SIZE
        else:
            head = response_head(200, [(b"content-length", str(HALF_LENGTH).encode())])
            await stream.send_all(head)
            await send_pattern(stream, HALF_SENT)
        record.hung_up[target] = trio.current_time()
        if kind == "half-rst":
            await reset(stream)
        return False
    await stream.send_all(response_head(404, [(b"content-length", b"0")]))
    return False


async def _until_closed(
    stream: trio.SocketStream, target: str, record: UpstreamRecord, head: bytes, body: int
) -> None:
    """Send ``head`` and ``body`` pattern bytes while watching for the proxy closing; once
    it has (EOF or reset seen on either direction), note when and return."""

    async def watch(cancel_scope: trio.CancelScope) -> None:
        # Whatever the proxy still sends (the rest of a request body) is discarded; the
        # end of the stream, or a reset, is the proxy letting go of the connection.
        try:
            while await stream.receive_some(READ_SIZE):
                pass
        except (trio.BrokenResourceError, OSError):
            pass
        _closed(record, target)
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        try:
            await stream.send_all(head)
            counter = [0]
            try:
                await send_pattern(stream, body, counter)
            finally:
                record.body_bytes[target] = counter[0]
        except (trio.BrokenResourceError, OSError):
            _closed(record, target)
            nursery.cancel_scope.cancel()


async def run_all(jobs: Sequence[Callable[[], Awaitable[None]]], *, limit: int) -> None:
    """Run ``jobs`` with at most ``limit`` at a time; the first failure cancels the rest."""
    limiter = trio.CapacityLimiter(limit)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with limiter:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
