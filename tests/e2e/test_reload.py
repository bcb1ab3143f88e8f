"""Reload under load through the real CLI: SIGHUP and ``--watch``.

While GET, POST, SSE and WebSocket clients run, the config is reloaded 20 times
(10 by SIGHUP, 10 by a change of the watched file), switching the one route
between two upstream groups, with a bad config in between. No request fails;
the stream and the tunnel opened before the first reload finish on the
upstream they started with; requests after a reload follow the new route; the
bad config changes nothing.
"""

from __future__ import annotations

import json
import signal
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
import upstream_app
from fixtures import ProxyProcess, run_proxy, serve_asgi

pytestmark = pytest.mark.timeout(90)

Scope = MutableMapping[str, Any]


def _named(name: str) -> Any:
    """``upstream_app.app`` whose every HTTP response says ``x-upstream: name``."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await upstream_app.app(scope, receive, send)
            return

        async def named_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-upstream", name)]}
            await send(message)

        await upstream_app.app(scope, receive, named_send)

    return app


def _config(a: str, b: str, to: str, *, broken: bool = False) -> str:
    match = 'match = { path_prefix = "no-slash" }\n' if broken else ""
    return (
        f'[upstreams.a]\nservers = ["{a}"]\n[upstreams.b]\nservers = ["{b}"]\n'
        f'[routes.r]\nupstream = "{to}"\n{match}'
    )


async def _reloaded(proxy: ProxyProcess, count: int) -> None:
    """Wait for the ``count``-th successful reload in the log."""
    await _logged(proxy, "config reloaded", count)


async def _logged(proxy: ProxyProcess, needle: str, count: int) -> None:
    """Wait until ``needle`` is in the proxy's log ``count`` times."""
    with trio.fail_after(10):
        while proxy.stderr().count(needle) < count:  # noqa: ASYNC110 (another process's log)
            await trio.sleep(0.02)


@pytest.mark.parametrize("how", ["sighup", "watch"])
async def test_reloads_under_load_drop_nothing(
    how: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    a = await serve_asgi(_named(b"A"), nursery)
    b = await serve_asgi(_named(b"B"), nursery)
    path = trio.Path(tmp_path / "trioproxy.toml")
    await path.write_text(_config(a, b, "a"))
    args = ["--config", str(path)] + (["--watch"] if how == "watch" else [])
    failures: list[str] = []
    counts = {"get": 0, "post": 0}
    async with run_proxy(*args) as proxy, httpx.AsyncClient(timeout=10, trust_env=False) as http:
        base = proxy.url
        stop = trio.Event()

        async def getter() -> None:
            while not stop.is_set():
                response = await http.get(base + "/echo")
                if response.status_code != 200:
                    failures.append(f"GET {response.status_code}")
                counts["get"] += 1

        async def poster() -> None:
            body = b"x" * 100_000
            while not stop.is_set():
                response = await http.post(base + "/upload", content=body)
                if response.status_code != 200 or response.json()["len"] != len(body):
                    failures.append(f"POST {response.status_code}")
                counts["post"] += 1

        # Opened on upstream A before the first reload; 100 events, 50 ms apart.
        events: list[int] = []
        sse_upstream: list[str] = []
        sse_open = trio.Event()

        async def sse() -> None:
            async with http.stream("GET", base + "/sse?n=100&interval=0.05") as response:
                sse_upstream.append(response.headers["x-upstream"])
                sse_open.set()
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:])["i"])

        echoes = 0

        async def tunnel(ready: trio.Event) -> None:
            nonlocal echoes
            url = base.replace("http://", "ws://") + "/ws"
            async with trio_websocket.open_websocket_url(url) as ws:
                ready.set()
                while not stop.is_set():
                    await ws.send_message(f"m{echoes}")
                    assert await ws.get_message() == f"m{echoes}"
                    echoes += 1
                    await trio.sleep(0.05)

        async with trio.open_nursery() as clients:
            clients.start_soon(getter)
            clients.start_soon(poster)
            clients.start_soon(sse)
            ready = trio.Event()
            clients.start_soon(tunnel, ready)
            await ready.wait()
            await sse_open.wait()

            reloads = 0
            for i in range(10):
                to = "b" if i % 2 == 0 else "a"
                if i == 5:
                    # A bad config in between: refused, the route stays where it was.
                    await path.write_text(_config(a, b, to, broken=True))
                    if how == "sighup":
                        proxy.process.send_signal(signal.SIGHUP)
                    await _logged(proxy, "reload refused", 1)
                    expected = "a" if to == "b" else "b"
                    response = await http.get(base + "/echo")
                    assert response.headers["x-upstream"] == expected.upper()
                await path.write_text(_config(a, b, to))
                if how == "sighup":
                    proxy.process.send_signal(signal.SIGHUP)
                reloads += 1
                await _reloaded(proxy, reloads)
                # The next request follows the new route.
                response = await http.get(base + "/echo")
                assert response.headers["x-upstream"] == to.upper(), (i, to)
            stop.set()

    assert not failures, failures[:5]
    # The stream began on A and was neither cut nor moved by 10 reloads.
    assert sse_upstream == ["A"]
    assert events == list(range(100))
    assert echoes > 10
    assert counts["get"] > 20 and counts["post"] > 5
    assert "Traceback" not in proxy.stderr()
