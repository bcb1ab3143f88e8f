"""Rate limits (memory store) and ``max_inflight`` through the real CLI.

The upstream counts what reaches it, so a test can tell that a refused request
never did. Clients are raw sockets: the 40-request burst is 40 connections
opened first, then one write each, so the requests reach the proxy within a
few milliseconds, well inside the 100 ms the test allows them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
import upstream_app
from e2e.conftest import FrontEnd, RawConnection, RawResponse
from e2e.metrics_helpers import admin_scrape, admin_status
from fixtures import REPO_ROOT, ProxyProcess, raw_request, run_proxy, serve_asgi

pytestmark = pytest.mark.timeout(60)


class CountingApp:
    """``upstream_app.app`` that counts the HTTP requests it receives, by path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            self.hits[scope["path"]] += 1
        await upstream_app.app(scope, receive, send)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trioproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


async def connect(proxy: ProxyProcess, source: str = "127.0.0.1") -> RawConnection:
    """A raw connection to the proxy from ``source`` (127.0.0.2 is another client)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((proxy.host, proxy.port))
    return RawConnection(trio.SocketStream(sock))


async def get(proxy: ProxyProcess, path: str, source: str = "127.0.0.1") -> RawResponse:
    connection = await connect(proxy, source)
    try:
        await connection.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return await connection.read_response(within=10)
    finally:
        await connection.aclose()


async def burst(proxy: ProxyProcess, path: str, n: int) -> tuple[list[RawResponse], float]:
    """``n`` GETs sent at once on ``n`` connections; the answers, and the seconds the
    writes took."""
    connections = [await connect(proxy) for _ in range(n)]
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    responses: list[RawResponse | None] = [None] * n
    try:
        started = trio.current_time()
        for connection in connections:
            await connection.send(request)
        spread = trio.current_time() - started

        async def read(i: int) -> None:
            responses[i] = await connections[i].read_response(within=20)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(read, i)
    finally:
        for connection in connections:
            await connection.aclose()
    return [r for r in responses if r is not None], spread


async def test_local_rate_limit_burst_wait_and_other_keys(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery
) -> None:
    app = CountingApp()
    upstream = await serve_asgi(app, nursery)
    config = write_config(
        tmp_path,
        f"""
        [server]
        admin = {{ port = 0 }}
        [upstreams.app]
        servers = ["{upstream}"]
        [routes.limited]
        upstream = "app"
        rate_limit = [{{ average = 10, period = "1s", burst = 5, key = "ip" }}]
        """,
    )
    async with front_end("--config", config) as proxy:
        responses, spread = await burst(proxy, "/echo", 40)
        assert spread < 0.1, f"the client took {spread:.3f} s to send the burst"
        assert len(responses) == 40
        statuses = Counter(r.status for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert 5 <= statuses[200] <= 7, statuses
        # Refused requests never reached the upstream.
        assert app.hits["/echo"] == statuses[200]
        waits = []
        for refused in (r for r in responses if r.status == 429):
            retry_after = refused.get("retry-after")
            assert retry_after is not None and retry_after.isdigit()
            waits.append(int(retry_after))
            assert refused.get("ratelimit-policy") == '"ip/1s";q=10;w=1;trioproxy-burst=5'
            assert re.fullmatch(r'"ip/1s";r=0;t=\d+', refused.get("ratelimit") or "")
        assert min(waits) >= 1
        # Another client (another key) is unaffected.
        other = await get(proxy, "/echo", source="127.0.0.2")
        assert other.status == 200
        # After the wait it names, a request passes.
        await trio.sleep(max(waits))
        assert (await get(proxy, "/echo")).status == 200
        status = await admin_status(proxy)
        assert status["limits"]["routes"]["limited"]["rejected"] == statuses[429]
        assert status["limits"]["memory"]["keys"] == 2
        metrics = await admin_scrape(proxy)
        rejected = metrics.value("trioproxy_ratelimit_rejected_total", route="limited")
        assert rejected == statuses[429]


async def test_a_refused_request_keeps_its_connection(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery
) -> None:
    config = write_config(
        tmp_path,
        """
        [routes.pong]
        respond = { status = 200, body = "pong" }
        rate_limit = [{ average = 1, period = "1m", burst = 1, key = "route" }]
        """,
    )
    async with front_end("--config", config, "--log-level", "warning") as proxy:
        connection = await connect(proxy)
        try:
            request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
            await connection.send(request)
            assert (await connection.read_response()).status == 200
            await connection.send(request)
            refused = await connection.read_response()
            assert refused.status == 429
            assert refused.get("connection") is None
            assert 1 <= int(refused.get("retry-after") or 0) <= 60
            # Same connection, still served (and still refused).
            await connection.send(request)
            assert (await connection.read_response()).status == 429
        finally:
            await connection.aclose()


async def test_rate_limit_by_header_and_api_key(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    config = write_config(
        tmp_path,
        f"""
        [upstreams.app]
        servers = ["{upstream}"]
        [routes.by_header]
        upstream = "app"
        match = {{ path_prefix = "/echo/h" }}
        rate_limit = [{{ average = 1, period = "1m", burst = 2, key = "header:x-tenant" }}]
        [routes.by_key]
        upstream = "app"
        match = {{ path_prefix = "/echo/k" }}
        rate_limit = [{{ average = 1, period = "1m", burst = 1, key = "api_key" }}]
        """,
    )

    async def status(path: str, header: str = "") -> int:
        raw = await raw_request(
            proxy.host,
            proxy.port,
            f"GET {path} HTTP/1.1\r\nHost: t\r\n{header}Connection: close\r\n\r\n".encode(),
        )
        return int(raw.split(b" ", 2)[1])

    async with front_end("--config", config, "--log-level", "warning") as proxy:
        blue, red = "X-Tenant: blue\r\n", "X-Tenant: red\r\n"
        assert [await status("/echo/h", blue) for _ in range(3)] == [200, 200, 429]
        assert await status("/echo/h", red) == 200
        # No header: one shared bucket, limited too.
        assert [await status("/echo/h") for _ in range(3)] == [200, 200, 429]
        alice, bob = "Authorization: Bearer alice\r\n", "Authorization: Bearer bob\r\n"
        assert [await status("/echo/k", alice) for _ in range(2)] == [200, 429]
        assert await status("/echo/k", bob) == 200


async def test_max_inflight_counts_requests_and_tunnels(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery
) -> None:
    app = CountingApp()
    upstream = await serve_asgi(app, nursery)
    config = write_config(
        tmp_path,
        f"""
        [upstreams.app]
        servers = ["{upstream}"]
        [routes.capped]
        upstream = "app"
        max_inflight = 2
        """,
    )
    async with front_end("--config", config, "--log-level", "warning") as proxy:
        slow: list[RawResponse] = []

        async def slow_request() -> None:
            slow.append(await get(proxy, "/slow?delay=2"))

        async with trio.open_nursery() as requests:
            requests.start_soon(slow_request)
            requests.start_soon(slow_request)
            with trio.fail_after(10):
                while app.hits["/slow"] < 2:  # noqa: ASYNC110 (another process)
                    await trio.sleep(0.01)
            busy = await get(proxy, "/echo")
            assert busy.status == 503
            assert busy.get("retry-after") == "1"
        assert [r.status for r in slow] == [200, 200]
        assert app.hits["/echo"] == 0  # the refused one never reached the upstream
        assert (await get(proxy, "/echo")).status == 200

        # An open event stream holds its place until it ends.
        stream = await connect(proxy)
        try:
            await stream.send(b"GET /sse?n=3&interval=0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b" 200 " in await stream.read_head_bytes(within=10)
            other = await connect(proxy)
            try:
                await other.send(b"GET /sse?n=3&interval=0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
                assert b" 200 " in await other.read_head_bytes(within=10)
                assert (await get(proxy, "/echo")).status == 503
            finally:
                await other.aclose()
        finally:
            await stream.aclose()
        with trio.fail_after(10):
            while (await get(proxy, "/echo")).status != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)

        # An open WebSocket tunnel holds its place until it closes.
        ws_url = proxy.url.replace("http://", "ws://") + "/ws"
        async with trio_websocket.open_websocket_url(ws_url) as first:
            async with trio_websocket.open_websocket_url(ws_url) as second:
                await first.send_message("a")
                assert await first.get_message() == "a"
                await second.send_message("b")
                assert await second.get_message() == "b"
                assert (await get(proxy, "/echo")).status == 503
        # Closed: the places are given back (the proxy sees the close a moment later).
        with trio.fail_after(10):
            while (await get(proxy, "/echo")).status != 200:  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_limits_survive_a_reload(tmp_path: Path) -> None:
    import signal

    text = """
        [routes.pong]
        respond = {{ status = 200, body = "{body}" }}
        rate_limit = [{{ average = 1, period = "1m", burst = 2, key = "ip" }}]
        """
    config = write_config(tmp_path, text.format(body="one"))
    async with run_proxy("--config", config, "--log-level", "info") as proxy:
        assert [(await get(proxy, "/")).status for _ in range(2)] == [200, 200]
        await trio.Path(config).write_text(textwrap.dedent(text.format(body="two")))
        proxy.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            await proxy.wait_for_stderr("config reloaded (generation 2)")
        # The debt is carried over: a reload forgives nothing.
        refused = await get(proxy, "/")
        assert refused.status == 429
        assert math.isfinite(int(refused.get("retry-after") or "0"))


def test_the_example_config_passes_check_config() -> None:
    example = "examples/rate-limits.toml"
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--check-config", "--config", example],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "config OK: 3 routes, 2 upstream groups, 3 servers\n"
