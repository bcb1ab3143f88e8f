"""``handler = "health"`` and ``"ping"`` routes, and the AI-service proxy's headers,
through the real CLI with ``examples/ai-service.toml`` (and the ASGI app under
hypercorn, for the cases that take ``front_end``)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import upstream_app
from e2e.conftest import FrontEnd
from e2e.metrics_helpers import scrape
from fixtures import REPO_ROOT, serve_asgi

pytestmark = pytest.mark.timeout(60)

EXAMPLE = REPO_ROOT / "examples" / "ai-service.toml"


def example_config(tmp_path: Path, server: str, health: str | None = None) -> str:
    """The example, with its server replaced and the admin port free."""
    text = EXAMPLE.read_text().replace("http://127.0.0.1:8000", server)
    text = text.replace("port = 9901", "port = 0")
    if health is not None:
        text = re.sub(r"^health = .*$", f"health = {health}", text, flags=re.MULTILINE)
    path = tmp_path / "ai-service.toml"
    path.write_text(text)
    return str(path)


def test_the_example_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == "config OK: 4 routes, 1 upstream groups, 1 servers"


async def test_health_ping_and_the_headers_on_every_response(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    config = example_config(tmp_path, upstream, health="false")
    async with front_end("--config", config) as proxy:
        health = await http_client.get(f"{proxy.url}/api/health")
        ping = await http_client.get(f"{proxy.url}/api/ping")
        proxied = await http_client.get(f"{proxy.url}/echo", headers={"x-request-id": "abc-1"})
        metrics = await scrape(http_client, f"{proxy.url}/metrics")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["target_url"] == upstream
    assert body["timeout"] == 600.0
    assert body["ssl_verify"] is True
    assert [(s["url"], s["healthy"]) for s in body["servers"]] == [(upstream, True)]
    assert (ping.status_code, ping.text) == (200, "pong\n")
    assert proxied.status_code == 200
    for response in (health, ping, proxied):
        assert response.headers["x-proxy-by"] == "trioproxy"
        assert re.fullmatch(r"\d+\.\d{3}", response.headers["x-process-time"])
        assert response.headers.get_list("x-request-id")[-1]
    assert proxied.headers["x-request-id"] == "abc-1"
    # The request id sent upstream is the one the client sees.
    echoed = dict((k.lower(), v) for k, v in proxied.json()["headers"])
    assert echoed["x-request-id"] == "abc-1"
    # Handler routes are counted under their own names.
    assert (
        metrics.value(
            "trioproxy_requests_total", route="health", upstream="", method="GET", code="200"
        )
        == 1
    )


async def test_health_is_503_when_no_server_can_take_requests(
    tmp_path: Path, front_end: FrontEnd, http_client: httpx.AsyncClient
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    health = '{ path = "/health", interval = "100ms", timeout = "500ms", rise = 1, fall = 1 }'
    config = example_config(tmp_path, f"http://127.0.0.1:{port}", health=health)
    async with front_end("--config", config, health_check=True) as proxy:
        with trio.fail_after(10):
            url = f"{proxy.url}/api/health"
            # Polling another process: no trio.Event to wait on.
            while (response := await http_client.get(url)).status_code != 503:  # noqa: ASYNC110
                await trio.sleep(0.1)
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["servers"][0]["healthy"] is False
