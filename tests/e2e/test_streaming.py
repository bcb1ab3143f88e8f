"""Bodies stream through the proxy: intact, in bounded memory, at the reader's pace, and
without delay for server-sent events.

The proxy is the real ``python -m trioproxy`` process; its RSS is sampled from outside
every ~50 ms for the whole of each transfer (``resources.RssMonitor``). A proxy that
buffered a body, or read ahead of a slow client, would show it there.

Downloads come from a raw trio upstream that writes the ``upstream_app`` pattern as
fast as the socket takes it (hypercorn is the slower of the two at a gigabyte); uploads
go to ``upstream_app``'s ``/upload``, which hashes what it receives.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import h11
import pytest
import trio
from e2e.resources import (
    PATTERN_CHUNK,
    READ_SIZE,
    RSS_LIMIT,
    GiB,
    MiB,
    RssMonitor,
    open_request,
    pattern_digest,
    pattern_upstream,
    receive_body_digest,
    receive_head,
)
from fixtures import run_proxy, serve_tcp_handler

#: Ceiling for one gigabyte through the proxy; ~4 s alone on two cores, so this leaves
#: room for a loaded machine.
GIB_CEILING = 45


def _report(what: str, size: int, seconds: float, rss: RssMonitor) -> None:
    print(
        f"\n{what}: {size / MiB:.0f} MiB in {seconds:.2f} s = {size / MiB / seconds:.0f} MiB/s; "
        f"proxy {rss.summary()}"
    )


@pytest.mark.timeout(GIB_CEILING + 15)
async def test_download_1gib_is_intact_in_bounded_memory(
    nursery: trio.Nursery, front_end: Any
) -> None:
    host, port = await serve_tcp_handler(pattern_upstream(GiB), nursery)
    expected = pattern_digest(GiB)
    async with front_end("--upstream", f"http://{host}:{port}") as proxy:
        with trio.fail_after(GIB_CEILING), RssMonitor(proxy.pid) as rss:
            started = trio.current_time()
            stream = await open_request(
                proxy.host, proxy.port, b"GET /bytes HTTP/1.1\r\nHost: test\r\n\r\n"
            )
            try:
                head, first = await receive_head(stream)
                received, digest = await receive_body_digest(stream, GiB, first)
            finally:
                await trio.aclose_forcefully(stream)
            elapsed = trio.current_time() - started
    _report("1 GiB download", received, elapsed, rss)
    assert head.status == 200
    assert head.headers[b"content-length"] == str(GiB).encode()
    assert received == GiB
    assert digest == expected
    assert rss.peak < RSS_LIMIT, rss.summary()
    assert rss.max_gap < 1.0, rss.summary()  # the sampling itself kept up


async def _upload(
    proxy_host: str, proxy_port: int, size: int, *, chunked: bool
) -> tuple[int, dict[str, object]]:
    """POST ``pattern_bytes(size)`` to ``/upload`` in 64 KiB writes; return the status and
    the upstream's JSON answer."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    stream = await open_request(
        proxy_host,
        proxy_port,
        b"POST /upload HTTP/1.1\r\nHost: test\r\n" + framing + b"\r\n\r\n",
    )
    try:
        chunk = b"%x\r\n" % len(PATTERN_CHUNK) + PATTERN_CHUNK + b"\r\n" if chunked else None
        remaining = size
        while remaining:
            # Whole chunks only: every size used here is a multiple of 64 KiB.
            await stream.send_all(chunk or PATTERN_CHUNK)
            remaining -= len(PATTERN_CHUNK)
        if chunked:
            await stream.send_all(b"0\r\n\r\n")
        head, first = await receive_head(stream)
        length = int(head.headers[b"content-length"])
        body = bytearray(first)
        while len(body) < length:
            data = await stream.receive_some(READ_SIZE)
            assert data, f"EOF in the upload answer: {bytes(body)!r}"
            body += data
    finally:
        await trio.aclose_forcefully(stream)
    return head.status, json.loads(body)


@pytest.mark.timeout(GIB_CEILING + 15)
async def test_upload_1gib_content_length_is_intact_in_bounded_memory(
    upstream: str, front_end: Any
) -> None:
    expected = pattern_digest(GiB)
    async with front_end("--upstream", upstream) as proxy:
        with trio.fail_after(GIB_CEILING), RssMonitor(proxy.pid) as rss:
            started = trio.current_time()
            status, answer = await _upload(proxy.host, proxy.port, GiB, chunked=False)
            elapsed = trio.current_time() - started
    _report("1 GiB upload (Content-Length)", GiB, elapsed, rss)
    assert status == 200
    assert answer == {"len": GiB, "sha256": expected}
    assert rss.peak < RSS_LIMIT, rss.summary()
    assert rss.max_gap < 1.0, rss.summary()  # the sampling itself kept up


@pytest.mark.timeout(GIB_CEILING)
async def test_upload_256mib_chunked_is_intact_in_bounded_memory(upstream: str) -> None:
    size = 256 * MiB
    expected = pattern_digest(size)
    async with run_proxy("--upstream", upstream) as proxy:
        with trio.fail_after(GIB_CEILING / 2), RssMonitor(proxy.pid) as rss:
            started = trio.current_time()
            status, answer = await _upload(proxy.host, proxy.port, size, chunked=True)
            elapsed = trio.current_time() - started
    _report("256 MiB upload (chunked)", size, elapsed, rss)
    assert status == 200
    assert answer == {"len": size, "sha256": expected}
    assert rss.peak < RSS_LIMIT, rss.summary()
    assert rss.max_gap < 1.0, rss.summary()  # the sampling itself kept up


async def test_slow_reader_holds_back_the_upstream_not_the_proxy_memory(
    nursery: trio.Nursery,
    front_end: Any,
) -> None:
    """A client that pauses, then reads at a trickle, while the upstream has 512 MiB ready:
    the proxy stops reading the upstream instead of buffering for the client."""
    size = 512 * MiB
    sent = [0]
    host, port = await serve_tcp_handler(pattern_upstream(size, sent), nursery)
    async with front_end("--upstream", f"http://{host}:{port}") as proxy:
        with trio.fail_after(20), RssMonitor(proxy.pid) as rss:
            stream = await open_request(
                proxy.host, proxy.port, b"GET /bytes HTTP/1.1\r\nHost: test\r\n\r\n"
            )
            try:
                head, first = await receive_head(stream)
                received = len(first)
                while received < 4 * MiB:
                    received += len(await stream.receive_some(READ_SIZE))
                # Pause: whatever the upstream still gets to send must fit in the
                # socket buffers in between.
                await trio.sleep(1.5)
                sent_after_pause = sent[0]
                # A trickle: 64 KiB every 20 ms (~3 MiB/s) for 1.5 s.
                for _ in range(75):
                    received += len(await stream.receive_some(READ_SIZE))
                    await trio.sleep(0.02)
                await trio.sleep(0.5)
                in_flight = sent[0] - received
            finally:
                await trio.aclose_forcefully(stream)
    print(
        f"\nslow reader: client read {received / MiB:.1f} MiB, upstream sent "
        f"{sent[0] / MiB:.1f} MiB (after the pause {sent_after_pause / MiB:.1f} MiB); "
        f"in flight {in_flight / MiB:.1f} MiB of {size / MiB:.0f}; proxy {rss.summary()}"
    )
    assert head.status == 200
    assert rss.peak < RSS_LIMIT, rss.summary()
    assert rss.max_gap < 1.0, rss.summary()  # the sampling itself kept up
    # Kernel socket buffers on both hops hold a few MiB each; a proxy that read ahead
    # would have taken (nearly) the whole body.
    assert in_flight < 64 * MiB


@pytest.mark.timeout(30)
async def test_sse_events_reach_the_client_within_50ms(upstream: str) -> None:
    count, interval = 50, 0.02
    async with run_proxy("--upstream", upstream) as proxy:
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=f"/sse?n={count}&interval={interval}",
            headers=[("Host", "test"), ("Accept", "text/event-stream")],
        )
        latencies: list[float] = []
        seen: list[int] = []
        with trio.fail_after(15):
            stream = await open_request(proxy.host, proxy.port, client.send(request) or b"")
            try:
                response: h11.Response | None = None
                pending = b""
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(READ_SIZE))
                    elif isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        arrived = time.time()
                        pending += event.data
                        *complete, pending = pending.split(b"\n\n")
                        for text in complete:
                            data = next(
                                line[len(b"data: ") :]
                                for line in text.split(b"\n")
                                if line.startswith(b"data: ")
                            )
                            payload = json.loads(data)
                            seen.append(payload["i"])
                            latencies.append(arrived - payload["t"])
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        raise AssertionError(f"unexpected {event!r}")
            finally:
                await trio.aclose_forcefully(stream)
    ms = sorted(latency * 1000 for latency in latencies)
    print(
        f"\nSSE: {len(ms)} events, latency p50 {statistics.median(ms):.2f} ms, "
        f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms, max {ms[-1]:.2f} ms"
    )
    assert response is not None
    assert response.status_code == 200
    assert dict(response.headers)[b"content-type"] == b"text/event-stream"
    assert seen == list(range(count))
    late = [(i, round(latency * 1000, 1)) for i, latency in enumerate(latencies) if latency > 0.05]
    assert not late, f"events later than 50 ms (index, ms): {late}"
