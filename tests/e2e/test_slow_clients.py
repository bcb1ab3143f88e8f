"""A client that reads slowly holds little of the proxy's memory.

While a write to the client waits, the upstream's data piles up in the kernel, so
every read of the upstream comes back full and the reads would grow to their
largest (256 KiB): that much held per slow download. Once a write takes longer
than ``SLOW_CLIENT_WRITE`` the reads of the rest of the exchange stay at 64 KiB.

Driven in-process through the ASGI app, whose ``send`` is the test's: the body
messages it gets are the reads the engine made.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio
from upstream_app import pattern_sha256

from trioproxy import engine
from trioproxy.asgi import create_app
from trioproxy.upstream.connection import READ_SIZE

SIZE = 8 * 1024 * 1024


async def _slow_download(app: Any, target: str) -> list[bytes]:
    """GET ``target`` through ``app``, 10 ms per body message: the bodies."""
    bodies: list[bytes] = []
    status: list[int] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            bodies.append(message["body"])
            await trio.sleep(0.01)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": target, "raw_path": target.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"proxy.test")], "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    await app(scope, receive, send)
    assert status == [200]
    return bodies


async def _serve(tmp_path: Path, upstream: str, nursery: trio.Nursery) -> Any:
    config = tmp_path / "trioproxy.toml"
    config.write_text(
        f'[server]\nlog_level = "warning"\n[upstreams.default]\nservers = ["{upstream}"]\n'
        "health = false\n"
    )
    app = create_app(str(config))
    to_app, app_receives = trio.open_memory_channel[dict[str, Any]](1)
    app_sends, from_app = trio.open_memory_channel[dict[str, Any]](1)
    nursery.start_soon(app, {"type": "lifespan"}, app_receives.receive, app_sends.send)
    await to_app.send({"type": "lifespan.startup"})
    started = await from_app.receive()
    assert started["type"] == "lifespan.startup.complete", started
    return app


@pytest.mark.parametrize("capped", [True, False])
async def test_a_slow_client_keeps_the_reads_small(
    tmp_path: Path,
    upstream: str,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    capped: bool,
) -> None:
    if not capped:  # the same download without the cap: the reads grow
        monkeypatch.setattr(engine, "SLOW_CLIENT_WRITE", 1000.0)
    app = await _serve(tmp_path, upstream, nursery)
    with trio.fail_after(30):
        bodies = await _slow_download(app, f"/bytes/{SIZE}")
    digest = hashlib.sha256()
    for body in bodies:
        digest.update(body)
    assert (sum(map(len, bodies)), digest.hexdigest()) == (SIZE, pattern_sha256(SIZE))
    largest_after_the_first = max(map(len, bodies[1:]))
    if capped:
        assert largest_after_the_first <= READ_SIZE, largest_after_the_first
    else:
        assert largest_after_the_first > READ_SIZE, largest_after_the_first
    nursery.cancel_scope.cancel()
