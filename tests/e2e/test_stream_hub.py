"""Streamed response bodies relayed by the stream hub (``trioproxy/relay_hub.py``), through
the real ``python -m trioproxy``.

A body without a Content-Length whose relay has to wait for the upstream goes to the one
hub task; the proxy logs each hand-over at debug level, and these tests check the log
first, so that every path below is known to have run in the hub. What the hub must keep
from the per-task path: bytes exact under many concurrent streams, bounded memory behind
a slow client, both sides let go of at once when either goes, the read timeout both ways,
draining, and a connection whose body ended going back to the pool.

The upstream is a raw trio server (``_stream_upstream``): every answer is chunked and
waits a little after its head, so that the proxy finds the body not there yet.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import random
import signal
import termios

import attrs
import h11
import pytest
import trio
from e2e.resources import (
    PATTERN_CHUNK,
    READ_SIZE,
    RSS_LIMIT,
    MiB,
    RssMonitor,
    fd_count,
    open_request,
    receive_until_eof,
    response_head,
    run_all,
    wait_for_fds,
    wait_until,
)
from fixtures import ProxyProcess, reset, run_proxy, serve_tcp_handler

pytestmark = pytest.mark.timeout(60)

PARSERS = pytest.mark.parametrize("parser", ["auto", "h11"])
HANDED_OVER = "relayed by the hub"
#: How soon the far side must be let go of, once one side has gone.
RELEASE_WITHIN = 1.0
CHUNKED_HEAD = response_head(200, [(b"transfer-encoding", b"chunked")])


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _events(target: str) -> list[bytes]:
    """The payloads ``/events/KEY`` sends: 1 to 40 of them, 1 B to 70 KiB each, seeded by
    the target (so the client knows what to expect)."""
    rng = random.Random(target)
    return [
        rng.randbytes(rng.choice((1, 9, 100, 1500, 4096, 65536, 70_000)))
        for _ in range(rng.randint(1, 40))
    ]


@attrs.define
class StreamRecord:
    """What ``_stream_upstream`` saw; times are ``trio.current_time()``."""

    accepted: int = 0
    #: Connections open now (a pooled keep-alive connection holds a proxy fd).
    open: int = 0
    requests: int = 0
    #: When the proxy's side of the connection that carried this target closed.
    closed: dict[str, float] = attrs.Factory(dict)
    #: When the upstream itself ended the connection (``/die``).
    hung_up: dict[str, float] = attrs.Factory(dict)
    #: When the last event of a ``/silent`` or ``/forever`` stream was sent.
    last_sent: dict[str, float] = attrs.Factory(dict)
    #: Body bytes of ``/flood`` written so far, and when the last write ended.
    flooded: int = 0
    flood_last: float = 0.0


def _stream_upstream(record: StreamRecord):  # type: ignore[no-untyped-def]
    """Answers by path, keep-alive, every body chunked and 50 ms after its head:

    ``/events/KEY``   ``_events(target)``, a few ms apart, then the last chunk.
    ``/slow/KEY``     ten events 30 ms apart, then the last chunk.
    ``/flood/N``      N bytes of the pattern, as fast as the socket takes them.
    ``/forever/KEY``  an event every 20 ms until the proxy closes.
    ``/silent/KEY``   one event, then nothing until the proxy closes.
    ``/die/close``, ``/die/reset``   five events, then a FIN or an RST.
    """

    async def handler(stream: trio.SocketStream) -> None:
        record.accepted += 1
        record.open += 1
        buffer = bytearray()
        target = ""
        try:
            while True:
                while (end := buffer.find(b"\r\n\r\n")) == -1:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        if target:
                            record.closed.setdefault(target, trio.current_time())
                        return
                    buffer += data
                target = bytes(buffer[:end]).split(b" ", 2)[1].decode()
                del buffer[: end + 4]
                record.requests += 1
                await stream.send_all(CHUNKED_HEAD)
                await trio.sleep(0.05)
                if not await _answer(stream, target, record):
                    return
        except (trio.BrokenResourceError, OSError):
            record.closed.setdefault(target, trio.current_time())
        finally:
            record.open -= 1

    return handler


async def _answer(stream: trio.SocketStream, target: str, record: StreamRecord) -> bool:
    kind = target.split("/")[1]
    if kind == "events":
        for i, data in enumerate(_events(target)):
            await stream.send_all(_chunk(data))
            if i % 4 == 0:
                await trio.sleep(0.005)
        await stream.send_all(b"0\r\n\r\n")
        return True
    if kind == "flood":
        remaining = int(target.split("/")[2])
        while remaining:
            data = PATTERN_CHUNK[:remaining]
            await stream.send_all(_chunk(data))
            remaining -= len(data)
            record.flooded += len(data)
            record.flood_last = trio.current_time()
        await stream.send_all(b"0\r\n\r\n")
        return True
    if kind == "slow":
        for _ in range(10):
            await stream.send_all(_chunk(b"data: slow\n\n"))
            await trio.sleep(0.03)
        await stream.send_all(b"0\r\n\r\n")
        return True
    if kind in ("forever", "silent"):

        async def beat() -> None:
            while True:
                await stream.send_all(_chunk(b"data: beat\n\n"))
                record.last_sent[target] = trio.current_time()
                if kind == "silent":
                    await trio.sleep_forever()
                await trio.sleep(0.02)

        async def watch(cancel_scope: trio.CancelScope) -> None:
            try:
                while await stream.receive_some(READ_SIZE):
                    pass
            except (trio.BrokenResourceError, OSError):
                pass
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                await beat()
            except (trio.BrokenResourceError, OSError):
                nursery.cancel_scope.cancel()
        record.closed.setdefault(target, trio.current_time())
        return False
    if kind == "die":
        for _ in range(5):
            await stream.send_all(_chunk(b"data: soon gone\n\n"))
            await trio.sleep(0.01)
        record.hung_up[target] = trio.current_time()
        if target.endswith("reset"):
            await reset(stream)
        return False
    raise AssertionError(f"unexpected target {target}")


async def _start(nursery: trio.Nursery) -> tuple[StreamRecord, str]:
    record = StreamRecord()
    host, port = await serve_tcp_handler(_stream_upstream(record), nursery)
    return record, f"http://{host}:{port}"


#: A pause in a flowing body longer than this is no longer the flow (TCP's persist
#: timer, which probes a zero window, starts at 200 ms).
PROBE_GAP = 0.15


def _queued(stream: trio.SocketStream) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    buffer = array.array("i", [0])
    fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, buffer)
    return buffer[0]


def _get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


async def _read_body(stream: trio.SocketStream, target: str) -> tuple[bytes, bool]:
    """The body of one response (h11 checks the framing), and whether it ended properly."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target=target, headers=[("Host", "test")]))
    body = bytearray()
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:
            return bytes(body), False
        if event is h11.NEED_DATA:
            try:
                client.receive_data(await stream.receive_some(READ_SIZE))
            except trio.BrokenResourceError:
                client.receive_data(b"")
        elif isinstance(event, h11.Response):
            assert event.status_code == 200, event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body), True


async def _handovers(proxy: ProxyProcess, count: int) -> None:
    """Wait until the proxy logged ``count`` hand-overs to the hub."""
    with trio.fail_after(5):
        while proxy.stderr().count(HANDED_OVER) < count:
            await proxy.wait_for_stderr(HANDED_OVER)
            await trio.sleep(0.01)


@PARSERS
async def test_200_concurrent_streams_arrive_byte_exact(nursery: trio.Nursery, parser: str) -> None:
    record, url = await _start(nursery)
    targets = [f"/events/{i}" for i in range(200)]
    bodies: dict[str, tuple[bytes, bool]] = {}

    async def fetch(target: str) -> None:
        stream = await open_request(proxy.host, proxy.port, _get(target))
        try:
            bodies[target] = await _read_body(stream, target)
        finally:
            await trio.aclose_forcefully(stream)

    async with run_proxy("--http", parser, "--upstream", url, "--log-level", "debug") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for target in targets:
                    clients.start_soon(fetch, target)
            await _handovers(proxy, len(targets))
            # Every upstream connection whose stream ended is pooled (keep-alive).
            fds = await wait_for_fds(proxy.pid, lambda: baseline + record.open, within=3)
            pooled = record.open
        stderr = await proxy.settled_stderr()
    print(f"\n200 streams: {record.accepted} upstream connections, {pooled} pooled")
    for target in targets:
        body, complete = bodies[target]
        assert complete, target
        assert body == b"".join(_events(target)), target
    assert fds == baseline + pooled
    assert "Traceback" not in stderr


async def test_a_stream_that_ended_leaves_its_connection_in_the_pool(
    nursery: trio.Nursery,
) -> None:
    record, url = await _start(nursery)
    async with run_proxy("--upstream", url, "--log-level", "debug") as proxy:
        with trio.fail_after(20):
            for i in range(3):
                target = f"/events/pool-{i}"
                stream = await open_request(proxy.host, proxy.port, _get(target))
                try:
                    body, complete = await _read_body(stream, target)
                finally:
                    await trio.aclose_forcefully(stream)
                assert complete
                assert body == b"".join(_events(target))
                # The client has the last chunk as soon as the hub wrote it; the
                # exchange's task returns the upstream connection to the pool just
                # after, and logs the exchange then. A next request sent before that
                # would rightly need a second connection.
                await proxy.wait_for_stderr(f'"GET {target} HTTP/1.1" 200')
            await _handovers(proxy, 3)
    assert record.requests == 3
    assert record.accepted == 1, "the upstream connection was not reused"


async def test_a_slow_client_holds_the_upstream_back_and_memory_bounded(
    nursery: trio.Nursery,
) -> None:
    """64 MiB streamed to a client that reads nothing for a second, then reads slowly:
    the upstream gets no further than the socket buffers and one read ahead, the proxy's
    RSS stays flat, and every byte arrives."""
    size = 64 * MiB
    record, url = await _start(nursery)
    target = f"/flood/{size}"
    async with run_proxy("--upstream", url, "--log-level", "debug") as proxy:
        with trio.fail_after(40), RssMonitor(proxy.pid) as rss:
            stream = await open_request(proxy.host, proxy.port, _get(target))
            try:
                await _handovers(proxy, 1)
                rss_start = rss.process.memory_info().rss
                await trio.sleep(1.0)
                ahead = record.flooded
                digest = hashlib.sha256()
                client = h11.Connection(h11.CLIENT)
                client.send(h11.Request(method="GET", target=target, headers=[("Host", "t")]))
                received = 0
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(READ_SIZE))
                        if received < 8 * MiB:
                            await trio.sleep(0.001)  # slowly at first
                    elif isinstance(event, h11.Response):
                        assert event.status_code == 200
                    elif isinstance(event, h11.Data):
                        digest.update(event.data)
                        received += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
            finally:
                await trio.aclose_forcefully(stream)
            rss_end = rss.process.memory_info().rss
    print(
        f"\nslow client: upstream {ahead / MiB:.1f} MiB ahead after 1 s; RSS start "
        f"{rss_start / MiB:.1f} MiB, peak {rss.peak / MiB:.1f}, end {rss_end / MiB:.1f}"
    )
    expected = hashlib.sha256((PATTERN_CHUNK * (size // len(PATTERN_CHUNK) + 1))[:size])
    assert received == size
    assert digest.hexdigest() == expected.hexdigest()
    assert ahead < 16 * MiB, "the upstream was read without bound behind a paused client"
    assert rss.peak - rss_start < 16 * MiB
    assert rss.peak < RSS_LIMIT


async def test_clients_leaving_mid_stream_release_upstreams_and_fds(
    nursery: trio.Nursery,
) -> None:
    record, url = await _start(nursery)
    targets = [f"/forever/{i}" for i in range(50)]
    left_at: dict[str, float] = {}

    async def leave(target: str) -> None:
        stream = await open_request(proxy.host, proxy.port, _get(target))
        try:
            received = b""
            while received.count(b"beat") < 3:
                data = await stream.receive_some(READ_SIZE)
                assert data, target
                received += data
        finally:
            left_at[target] = trio.current_time()
            if int(target.rsplit("/", 1)[1]) % 2:
                await reset(stream)
            else:
                await trio.aclose_forcefully(stream)

    async with run_proxy("--upstream", url, "--log-level", "debug") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(20):
            await run_all([lambda t=t: leave(t) for t in targets], limit=50)  # type: ignore[misc]
            await _handovers(proxy, len(targets))
            await wait_until(lambda: len(record.closed) == len(targets), within=3)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=3)
        stderr = await proxy.settled_stderr()
    release = sorted(record.closed[t] - left_at[t] for t in targets)
    print(f"\n50 clients left mid-stream: upstream released after {release[-1] * 1000:.1f} ms max")
    assert set(record.closed) == set(targets)
    assert release[-1] < RELEASE_WITHIN
    assert fds == baseline
    assert "Traceback" not in stderr


@PARSERS
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_upstream_leaving_mid_stream_cuts_the_client(
    nursery: trio.Nursery, parser: str, how: str
) -> None:
    record, url = await _start(nursery)
    target = f"/die/{how}"
    async with run_proxy("--http", parser, "--upstream", url, "--log-level", "debug") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            stream = await open_request(proxy.host, proxy.port, _get(target))
            try:
                body, _ = await receive_until_eof(stream)
                ended = trio.current_time()
            finally:
                await trio.aclose_forcefully(stream)
            await _handovers(proxy, 1)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
        with trio.fail_after(2):
            stderr = await proxy.wait_for_stderr("aborted")
    assert body.startswith(b"HTTP/1.1 200")
    assert body.count(b"soon gone") == 5
    assert not body.endswith(b"0\r\n\r\n"), "a cut body was passed as whole"
    assert ended - record.hung_up[target] < RELEASE_WITHIN
    assert fds == baseline
    assert "aborted" in stderr
    assert "Traceback" not in stderr


async def test_upstream_silent_is_cut_after_the_read_timeout(nursery: trio.Nursery) -> None:
    record, url = await _start(nursery)
    target = "/silent/1"
    async with run_proxy(
        "--upstream", url, "--read-timeout", "0.5", "--log-level", "debug"
    ) as proxy:
        with trio.fail_after(10):
            stream = await open_request(proxy.host, proxy.port, _get(target))
            try:
                body, _ = await receive_until_eof(stream)
                ended = trio.current_time()
            finally:
                await trio.aclose_forcefully(stream)
            await _handovers(proxy, 1)
            await wait_until(lambda: target in record.closed, within=2)
        with trio.fail_after(2):
            stderr = await proxy.wait_for_stderr("no data for 0.5 s")
    silent_for = ended - record.last_sent[target]
    print(f"\nupstream silent: cut after {silent_for * 1000:.0f} ms (read timeout 500 ms)")
    assert body.count(b"beat") == 1
    assert not body.endswith(b"0\r\n\r\n")
    # The upstream stamps its last send once send_all returns, which on a loaded
    # machine can be a little after the bytes left (seen: 499.3 ms once): a few ms
    # of slack below, the timer wheel's above.
    assert 0.49 <= silent_for < 0.5 * 17 / 16 + 0.25
    assert "no data for 0.5 s" in stderr


async def test_a_client_taking_nothing_is_cut_after_the_read_timeout(
    nursery: trio.Nursery,
) -> None:
    record, url = await _start(nursery)
    target = f"/flood/{256 * MiB}"
    async with run_proxy(
        "--upstream", url, "--read-timeout", "0.5", "--log-level", "debug"
    ) as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            stream = await open_request(proxy.host, proxy.port, _get(target))
            try:
                # The client's buffers fill within milliseconds; from the last byte the
                # proxy got into them, nothing moves until the proxy cuts the stream.
                # Watched from the start (the hand-over's log line may come later). A
                # change long after the flow stopped is the kernel's zero-window probe
                # (>= 200 ms) delivering bytes the proxy had handed over before: not
                # the proxy's doing, so it does not count as the flow.
                last_change = flow_end = trio.current_time()
                queued = 0
                while target not in record.closed:
                    if (now_queued := _queued(stream)) != queued:
                        now = trio.current_time()
                        if now - last_change < PROBE_GAP:
                            flow_end = now
                        last_change, queued = now, now_queued
                    await trio.sleep(0.005)
            finally:
                await trio.aclose_forcefully(stream)
            await _handovers(proxy, 1)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
            stderr = await proxy.wait_for_stderr("client gone")
    after_flow = record.closed[target] - flow_end
    after_last_byte = record.closed[target] - last_change
    print(
        f"\nclient taking nothing: cut {after_flow * 1000:.0f} ms after the flow stopped, "
        f"{after_last_byte * 1000:.0f} ms after its last byte"
    )
    # The proxy counts from its last send that moved bytes: the flow's end, or the probe
    # after it when that let the proxy send again (then the cut is ~0.5 s after it).
    assert after_flow >= 0.45
    assert after_last_byte < 0.5 * 17 / 16 + 0.3
    assert record.flooded < 32 * MiB
    assert fds == baseline
    assert "Traceback" not in stderr


async def test_drain_cuts_streams_in_the_hub_at_the_grace_and_exits(
    nursery: trio.Nursery,
) -> None:
    """SIGTERM with --grace 0.5: a stream that ends within the grace ends whole; endless
    ones are cut at the grace; the proxy exits 0 at once after."""
    _, url = await _start(nursery)
    endless = [f"/forever/drain-{i}" for i in range(20)]
    results: dict[str, tuple[bytes, str]] = {}

    async def read_all(target: str) -> None:
        stream = await open_request(proxy.host, proxy.port, _get(target))
        try:
            results[target] = await receive_until_eof(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async with run_proxy("--upstream", url, "--grace", "0.5", "--log-level", "debug") as proxy:
        with trio.fail_after(15):
            async with trio.open_nursery() as clients:
                for target in endless:
                    clients.start_soon(read_all, target)
                await _handovers(proxy, len(endless))
                finite = "/slow/drain"
                clients.start_soon(read_all, finite)
                await _handovers(proxy, len(endless) + 1)
                signalled = trio.current_time()
                proxy.process.send_signal(signal.SIGTERM)
            cut_after = trio.current_time() - signalled
            await proxy.process.wait()
            exited_after = trio.current_time() - signalled
    whole, _ = results[finite]
    assert whole.count(b"data: slow") == 10
    assert whole.endswith(b"0\r\n\r\n")
    for target in endless:
        body, _ = results[target]
        assert b"beat" in body
        assert not body.endswith(b"0\r\n\r\n")
    assert 0.5 <= cut_after < 1.5
    assert exited_after < 2.0
    assert proxy.returncode == 0


@PARSERS
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_a_body_that_ends_when_the_upstream_closes_arrives_whole(
    nursery: trio.Nursery, parser: str, version: bytes
) -> None:
    """No Content-Length, no chunking: the upstream's FIN is the body's end. The hub relays
    it to an HTTP/1.1 client as a body that ends properly, byte for byte, and the
    upstream connection, now closed, is not kept."""
    target = f"/until-close/{parser}/{version.decode()}"
    payloads = _events(target)
    served: list[float] = []

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(READ_SIZE)
        await stream.send_all(
            version + b" 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        )
        await trio.sleep(0.05)  # the proxy's relay finds the body not there yet
        for i, data in enumerate(payloads):
            await stream.send_all(data)
            if i % 4 == 0:
                await trio.sleep(0.005)
        served.append(trio.current_time())
        # Returning closes the connection with a FIN: the end of the body.

    host, port = await serve_tcp_handler(handler, nursery)
    async with run_proxy(
        "--http", parser, "--upstream", f"http://{host}:{port}", "--log-level", "debug"
    ) as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            stream = await open_request(proxy.host, proxy.port, _get(target))
            try:
                body, complete = await _read_body(stream, target)
            finally:
                await trio.aclose_forcefully(stream)
            await _handovers(proxy, 1)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
        stderr = await proxy.settled_stderr()
    assert served, "the upstream did not send its whole body"
    assert complete, "the body did not end properly"
    assert body == b"".join(payloads)
    assert fds == baseline, "the closed upstream connection was kept"
    assert "Traceback" not in stderr
