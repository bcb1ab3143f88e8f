"""Nothing outlives the exchange it belongs to: when a client or an upstream goes away,
the proxy lets go of the other side at once, and its file descriptors and memory come
back to where they were.

The proxy is measured from outside (``psutil``: ``num_fds()``, RSS). The upstream is a
raw server (``resources.recording_upstream``) that notes when the proxy closes each of
its connections, so "the upstream connection was closed" is observed, not inferred.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
from e2e.resources import (
    HALF_LENGTH,
    HALF_SENT,
    PATTERN_CHUNK,
    READ_SIZE,
    RSS_LIMIT,
    MiB,
    RssMonitor,
    UpstreamRecord,
    fd_count,
    open_request,
    receive_head,
    receive_until_eof,
    recording_upstream,
    run_all,
    wait_for_fds,
    wait_until,
)
from fixtures import ProxyProcess, raw_request, reset, run_proxy, serve_tcp_handler

#: How soon the far side must be let go of, once one side has gone.
RELEASE_WITHIN = 1.0
#: How much of a big body an aborting client reads before it leaves.
READ_BEFORE_ABORT = 256 * 1024


async def _start_upstream(nursery: trio.Nursery) -> tuple[UpstreamRecord, str]:
    record = UpstreamRecord()
    host, port = await serve_tcp_handler(recording_upstream(record), nursery)
    return record, f"http://{host}:{port}"


async def _abort_download(proxy: ProxyProcess, target: str, left_at: dict[str, float]) -> None:
    """GET a big body, read part of it, close; note when the client left."""
    stream = await open_request(
        proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    )
    try:
        head, first = await receive_head(stream)
        assert head.status == 200, head
        received = len(first)
        while received < READ_BEFORE_ABORT:
            data = await stream.receive_some(READ_SIZE)
            assert data, f"{target}: EOF after {received} bytes"
            received += len(data)
    finally:
        left_at[target] = trio.current_time()
        # Unread data is waiting: the kernel answers this close with a reset.
        await trio.aclose_forcefully(stream)


def _release_times(record: UpstreamRecord, left_at: dict[str, float]) -> list[float]:
    return [record.closed[target] - left for target, left in left_at.items()]


@pytest.mark.timeout(60)
async def test_200_aborted_downloads_release_fds_upstreams_and_memory(
    nursery: trio.Nursery,
    front_end: Any,
) -> None:
    record, url = await _start_upstream(nursery)
    left_at: dict[str, float] = {}
    targets = [f"/big/{i}" for i in range(200)]
    async with front_end("--upstream", url, "--log-level", "warning") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(40), RssMonitor(proxy.pid) as rss:
            # The first 20 warm the process up (allocator arenas, lazy imports); the
            # RSS after them is what the other 180 must not move materially.
            aborts = [partial(_abort_download, proxy, t, left_at) for t in targets]
            await run_all(aborts[:20], limit=10)
            await wait_for_fds(proxy.pid, lambda: baseline, within=2)
            rss_warm = rss.process.memory_info().rss
            await run_all(aborts[20:], limit=10)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=3)
            await wait_until(lambda: len(record.closed) == len(targets), within=2)
            rss_end = rss.process.memory_info().rss
        stderr = await proxy.settled_stderr()
    release = sorted(_release_times(record, left_at))
    print(
        f"\n200 aborts: fds baseline {baseline}, after {fds}; upstream accepted "
        f"{record.accepted}, saw {len(record.closed)} closed, still open {record.open}; "
        f"upstream released {release[len(release) // 2] * 1000:.1f} ms (p50), "
        f"{release[-1] * 1000:.1f} ms (max) after the client left; RSS after 20 "
        f"{rss_warm / MiB:.1f} MiB, after 200 {rss_end / MiB:.1f} MiB; proxy {rss.summary()}"
    )
    assert set(record.received) == set(targets)
    # A connection whose exchange was cut is never pooled: one per download.
    assert record.accepted == len(targets)
    assert set(record.closed) == set(targets)
    assert record.open == 0
    assert release[0] >= 0
    assert release[-1] < RELEASE_WITHIN
    assert fds == baseline
    assert rss_end - rss_warm < 8 * MiB
    assert rss.peak < RSS_LIMIT
    assert "connection handler failed" not in stderr


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_before_the_response_head_closes_the_upstream(
    nursery: trio.Nursery,
    how: str,
    front_end: Any,
) -> None:
    record, url = await _start_upstream(nursery)
    async with front_end("--upstream", url, "--log-level", "warning") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            target = "/think/1"
            stream = await open_request(
                proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
            )
            assert await wait_until(lambda: target in record.received, within=5)
            # The upstream is "thinking" (no response head yet) when the client goes.
            await trio.sleep(0.1)
            left = trio.current_time()
            if how == "reset":
                await reset(stream)
            else:
                await trio.aclose_forcefully(stream)
            await wait_until(lambda: target in record.closed, within=3)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
    assert target in record.closed, "the upstream connection was left open"
    released = record.closed[target] - left
    print(f"\nclient {how} while upstream thinks: upstream released in {released * 1000:.1f} ms")
    assert 0 <= released < RELEASE_WITHIN
    assert record.open == 0
    assert fds == baseline


async def _abort_upload(proxy: ProxyProcess, target: str, framing: str) -> float:
    """POST 1 MiB of a 100 MiB body to ``target`` and leave; return when the client left."""
    header = (
        b"Content-Length: %d" % (100 * MiB)
        if framing == "length"
        else b"Transfer-Encoding: chunked"
    )
    chunk = (
        PATTERN_CHUNK
        if framing == "length"
        else b"%x\r\n%b\r\n" % (len(PATTERN_CHUNK), PATTERN_CHUNK)
    )
    stream = await open_request(
        proxy.host,
        proxy.port,
        f"POST {target} HTTP/1.1\r\nHost: test\r\n".encode() + header + b"\r\n\r\n",
    )
    try:
        for _ in range(MiB // len(PATTERN_CHUNK)):
            await stream.send_all(chunk)
        # Let the body start reach the upstream before leaving.
        await trio.sleep(0.1)
    finally:
        left = trio.current_time()
        await trio.aclose_forcefully(stream)
    return left


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_client_leaving_mid_upload_closes_the_upstream(
    nursery: trio.Nursery, framing: str
) -> None:
    record, url = await _start_upstream(nursery)
    target = f"/think/upload-{framing}"
    async with run_proxy("--upstream", url, "--log-level", "warning") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            left = await _abort_upload(proxy, target, framing)
            await wait_until(lambda: target in record.closed, within=3)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
    assert target in record.received
    assert target in record.closed, "the upstream connection was left open"
    released = record.closed[target] - left
    print(f"\nclient left mid-upload ({framing}): upstream released in {released * 1000:.1f} ms")
    assert 0 <= released < RELEASE_WITHIN
    assert record.open == 0
    assert fds == baseline


async def test_client_leaving_mid_upload_is_logged_as_client_gone(nursery: trio.Nursery) -> None:
    _, url = await _start_upstream(nursery)
    async with run_proxy("--upstream", url) as proxy:
        with trio.fail_after(10):
            await _abort_upload(proxy, "/think/upload-log", "length")
            stderr = await proxy.wait_for_stderr('"POST /think/upload-log HTTP/1.1"')
    line = next(line for line in stderr.splitlines() if "/think/upload-log" in line)
    assert '" 499 ' in line, line


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("how", ["half", "half-rst"], ids=["upstream-close", "upstream-reset"])
async def test_upstream_leaving_mid_body_ends_the_client_connection(
    nursery: trio.Nursery, how: str, framing: str
) -> None:
    record, url = await _start_upstream(nursery)
    target = f"/{how}/1" + ("/chunked" if framing == "chunked" else "")
    async with run_proxy("--upstream", url, "--log-level", "warning") as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(10):
            stream = await open_request(
                proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
            )
            try:
                head, first = await receive_head(stream)
                with trio.move_on_after(5):
                    rest, ending = await receive_until_eof(stream)
                ended = trio.current_time()
            finally:
                await trio.aclose_forcefully(stream)
            fds = await wait_for_fds(proxy.pid, lambda: baseline, within=2)
    body = first + rest
    delay = ended - record.hung_up[target]
    print(f"\nupstream {how} mid-body ({framing}): client saw {ending} after {delay * 1000:.1f} ms")
    assert head.status == 200
    assert delay < RELEASE_WITHIN, "the client connection was left hanging"
    if framing == "length":
        assert head.headers[b"content-length"] == str(HALF_LENGTH).encode()
        # The client can tell: fewer bytes than announced.
        assert len(body) < HALF_LENGTH
    else:
        # No last chunk: the client can tell the body was cut.
        assert not body.endswith(b"0\r\n\r\n")
        assert len(body) >= HALF_SENT // 2
    assert fds == baseline


async def _status_of(proxy: ProxyProcess, target: str, *, close: bool) -> int:
    """GET ``target``; return the status. With ``close``, the request says
    ``Connection: close`` and the proxy ends the connection; without, the client reads
    the whole response and then leaves an idle keep-alive connection."""
    if close:
        answer = await raw_request(
            proxy.host,
            proxy.port,
            f"GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 "), f"{target}: {answer[:200]!r}"
        return int(answer.split(b" ", 2)[1])
    stream = await open_request(
        proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
    )
    try:
        head, body = await receive_head(stream)
        while len(body) < int(head.headers[b"content-length"]):
            data = await stream.receive_some(READ_SIZE)
            assert data, f"{target}: EOF in the body"
            body += data
    finally:
        await trio.aclose_forcefully(stream)
    return head.status


@pytest.mark.timeout(60)
async def test_fds_return_to_baseline_after_a_mixed_run(nursery: trio.Nursery) -> None:
    """Normal requests, 502s, 504s, aborted downloads, clients leaving early and
    upstreams hanging up mid-body, interleaved ten at a time."""
    record, url = await _start_upstream(nursery)
    left_at: dict[str, float] = {}
    statuses: dict[str, list[int]] = {}

    def expect(kind: str) -> Callable[[ProxyProcess, str], Awaitable[None]]:
        async def job(proxy: ProxyProcess, target: str) -> None:
            # Errors go to keep-alive clients only: after an error answer to a
            # "Connection: close" request the proxy's handler fails (see
            # test_error_answer_to_a_closing_client_ends_cleanly).
            close = kind == "ok" and target.endswith(("0", "2", "4", "6", "8"))
            status = await _status_of(proxy, target, close=close)
            statuses.setdefault(kind, []).append(status)

        return job

    async def leave_while_thinking(proxy: ProxyProcess, target: str) -> None:
        stream = await open_request(
            proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
        )
        try:
            await wait_until(lambda: target in record.received, within=5)
        finally:
            await trio.aclose_forcefully(stream)

    async def half(proxy: ProxyProcess, target: str) -> None:
        stream = await open_request(
            proxy.host, proxy.port, f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode()
        )
        try:
            head, first = await receive_head(stream)
            rest, _ = await receive_until_eof(stream)
            assert head.status == 200
        finally:
            await trio.aclose_forcefully(stream)
        assert len(first + rest) < HALF_LENGTH

    kinds: list[tuple[str, int, Callable[[ProxyProcess, str], Awaitable[None]]]] = [
        ("ok", 40, expect("ok")),
        ("drop", 10, expect("drop")),
        ("garbage", 10, expect("garbage")),
        ("think", 10, expect("think")),
        ("big", 30, lambda proxy, target: _abort_download(proxy, target, left_at)),
        ("think-leave", 10, leave_while_thinking),
        ("half", 10, half),
    ]
    # Interleave the kinds so that each mixes with all the others.
    per_kind = [
        [(kind, f"/{kind.split('-')[0]}/{kind}-{i}", job) for i in range(count)]
        for kind, count, job in kinds
    ]
    plan = [step for steps in itertools.zip_longest(*per_kind) for step in steps if step]
    # The 502s and 504s below are on purpose: keep the breaker from turning them into 503s.
    async with run_proxy(
        "--upstream", url, "--read-timeout", "0.5", "--breaker-failures", "0"
    ) as proxy:
        baseline = fd_count(proxy.pid)
        with trio.fail_after(40):
            await run_all([partial(job, proxy, target) for _, target, job in plan], limit=10)

            # Keep-alive connections idle in the proxy's pool are not leaks: the
            # upstream counts them, and each holds exactly one proxy fd.
            def expected() -> int:
                return baseline + record.idle_keepalive

            fds = await wait_for_fds(proxy.pid, expected, within=3)
            await wait_until(lambda: record.open == record.idle_keepalive, within=1)
            # Read now: the pooled connections close when the proxy exits.
            pooled, still_open = record.idle_keepalive, record.open
        stderr = await proxy.settled_stderr()
    print(
        f"\nmixed run of {len(plan)}: fds baseline {baseline}, after {fds} "
        f"(with {pooled} pooled keep-alive upstream connections); upstream "
        f"accepted {record.accepted}, open {still_open} at the end of the run"
    )
    assert statuses == {
        "ok": [200] * 40,
        "drop": [502] * 10,
        "garbage": [502] * 10,
        "think": [504] * 10,
    }
    assert still_open == pooled, "upstream connections left open mid-exchange"
    assert fds == baseline + pooled
    assert pooled <= 10
    assert max(_release_times(record, left_at)) < RELEASE_WITHIN
    assert "connection handler failed" not in stderr


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /drop/1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        b"GET /drop/1 HTTP/1.0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_error_answer_to_a_closing_client_ends_cleanly(
    nursery: trio.Nursery, request_head: bytes
) -> None:
    _, url = await _start_upstream(nursery)
    async with run_proxy("--upstream", url) as proxy:
        with trio.fail_after(10):
            answer = await raw_request(proxy.host, proxy.port, request_head)
            # The handler's failure, if any, is logged just after the connection closed.
            with trio.move_on_after(0.5):
                await proxy.wait_for_stderr("connection handler failed")
        stderr = await proxy.settled_stderr()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert "connection handler failed" not in stderr
    assert "Traceback" not in stderr
