"""The access log's JSON lines and ``--access-log PATH``, through the real CLI (and
the ASGI app under hypercorn, for the cases that take ``front_end``).

``log_format = "json"`` writes one object per line with the fields of issue 14;
``--access-log`` sends those lines to a file, and a file that takes no bytes (a
FIFO nobody reads) never makes the proxy wait.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import httpx
import pytest
import trio
import upstream_app
from e2e.conftest import FrontEnd
from fixtures import run_proxy, serve_asgi

pytestmark = pytest.mark.timeout(60)

FIELDS = {
    "time",
    "client",
    "method",
    "target",
    "status",
    "bytes_sent",
    "duration_ms",
    "ttfb_ms",
    "route",
    "upstream",
    "server",
    "request_id",
    "retries",
}


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_json_lines_on_stderr_carry_the_fields(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    config = tmp_path / "trioproxy.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            log_format = "json"
            [upstreams.api]
            servers = ["{upstream}"]
            health = false
            [routes.api]
            upstream = "api"
            match = {{ path_prefix = "/" }}
            """
        )
    )
    async with front_end("--config", str(config)) as proxy:
        response = await http_client.get(
            f"{proxy.url}/bytes/1000?x=1", headers={"x-request-id": "req-42"}
        )
        assert response.status_code == 200
        await http_client.get(f"{proxy.url}/status/404")
        log = await proxy.settled_stderr()
    lines = json_lines(log)
    assert len(lines) == 2, log
    first, second = lines
    assert set(first) == FIELDS
    assert first["method"] == "GET" and first["target"] == "/bytes/1000?x=1"
    assert first["status"] == 200 and first["bytes_sent"] == 1000
    assert first["route"] == "api" and first["upstream"] == "api"
    assert first["server"] == upstream
    assert first["request_id"] == "req-42"
    assert first["client"] == "127.0.0.1"
    assert first["retries"] == 0
    assert isinstance(first["duration_ms"], float) and isinstance(first["ttfb_ms"], float)
    assert 0 <= first["ttfb_ms"] <= first["duration_ms"]
    assert str(first["time"]).endswith("Z")
    assert second["status"] == 404


async def test_access_log_file_that_takes_no_bytes_never_blocks(
    tmp_path: Path, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    # A FIFO nobody reads: the proxy's writes fill it (64 KiB) and then wait in the
    # kernel. Opened for reading here first so that the proxy's open does not wait.
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with run_proxy(
            "--upstream", upstream, "--access-log", str(fifo), "--log-format", "json"
        ) as proxy:
            for _ in range(1000):  # ~300 bytes a line: several times what the FIFO holds
                with trio.fail_after(5):
                    response = await http_client.get(f"{proxy.url}/")
                assert response.status_code == 200
            # What was written is JSON lines; the access log is not on stderr.
            data = os.read(reader, 1 << 16)
            assert "trioproxy.access" not in await proxy.settled_stderr()
        lines = data.decode().splitlines()
        assert len(lines) > 100
        assert json.loads(lines[0])["status"] == 200
    finally:
        os.close(reader)


async def test_access_log_file_gets_the_lines(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    path = tmp_path / "logs" / "access.log"
    path.parent.mkdir()
    async with front_end("--upstream", upstream, "--access-log", str(path)) as proxy:
        for _ in range(3):
            assert (await http_client.get(f"{proxy.url}/echo")).status_code == 200
        stderr = await proxy.settled_stderr()
    text = path.read_text()
    assert text.count('"GET /echo HTTP/1.1" 200') == 3, text
    assert "GET /echo" not in stderr
