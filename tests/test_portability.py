"""The package without the Linux-only speed-ups: no epoll (so no stream hub) and no
``select.poll``, as on macOS and Windows (DESIGN.md, "Platform-specific speed-ups")."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx
import trio
from fixtures import REPO_ROOT, hypercorn_command, run_listening_process, serve_asgi
from upstream_app import app as upstream_app
from upstream_app import pattern_sha256

WITHOUT_EPOLL = str(REPO_ROOT / "tests" / "without_epoll.py")


async def test_proxy_runs_without_epoll_or_poll(nursery: trio.Nursery) -> None:
    """``python -m trioproxy`` with epoll and poll hidden: it starts (the hub off),
    relays a stream event by event on the exchange's own task, a chunked download
    whole, and reuses a pooled connection (whose liveness check then uses select)."""
    upstream = await serve_asgi(upstream_app, nursery)
    command = [
        sys.executable,
        WITHOUT_EPOLL,
        "trioproxy",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-health-check",
        "--upstream",
        upstream,
    ]
    with trio.fail_after(40):
        async with (
            run_listening_process(command, cwd=REPO_ROOT) as proxy,
            httpx.AsyncClient(base_url=proxy.url, timeout=10) as client,
        ):
            events = []
            async with client.stream("GET", "/sse?n=5&interval=0.05") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        events.append(int(line[4:]))
            assert events == [0, 1, 2, 3, 4]
            for _ in range(3):
                response = await client.get("/bytes/300000?chunked=1")
                assert response.status_code == 200
                assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(300000)
            assert "Traceback" not in proxy.stderr()


async def test_asgi_app_runs_without_epoll_or_poll(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``trioproxy.asgi:app`` under hypercorn's trio worker (in this process:
    ``--workers 0``) with epoll and poll hidden from trioproxy."""
    upstream = await serve_asgi(upstream_app, nursery)
    command = hypercorn_command("trioproxy.asgi:app", runner=(WITHOUT_EPOLL,))
    config = tmp_path / "trioproxy.toml"
    config.write_text(f'[upstreams.default]\nservers = ["{upstream}"]\nhealth = false\n')
    env = {"TRIOPROXY_CONFIG": str(config)}
    with trio.fail_after(40):
        async with (
            run_listening_process(command, env=env, cwd=tmp_path) as proxy,
            httpx.AsyncClient(base_url=proxy.url, timeout=10) as client,
        ):
            events = []
            async with client.stream("GET", "/sse?n=3&interval=0.05") as response:
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        events.append(int(line[4:]))
            assert events == [0, 1, 2]
            for _ in range(3):
                response = await client.get("/bytes/300000?chunked=1")
                assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(300000)
