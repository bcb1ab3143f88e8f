"""The Redis store of rate limits through the real CLI: two proxy processes on one
real redis-server enforce one limit (two ASGI apps under hypercorn too); with Redis
stopped, ``on_store_error = "allow"`` passes traffic and counts the errors,
``"deny"`` answers 503."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest
import trio
import upstream_app
from e2e.conftest import FrontEnd
from e2e.metrics_helpers import admin_scrape, admin_status
from fixtures import ProxyProcess, raw_request, run_proxy, serve_asgi
from redis_server import run_redis

pytestmark = pytest.mark.timeout(60)


def write_config(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


async def status_of(proxy: ProxyProcess, path: str = "/echo") -> int:
    raw = await raw_request(
        proxy.host,
        proxy.port,
        f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode(),
    )
    return int(raw.split(b" ", 2)[1])


def config_text(upstream: str, redis_url: str, on_store_error: str = "allow") -> str:
    return f"""
        [server]
        admin = {{ port = 0 }}
        redis = {{ url = "{redis_url}", timeout = "1s", on_store_error = "{on_store_error}" }}
        [upstreams.app]
        servers = ["{upstream}"]
        [routes.shared]
        upstream = "app"
        rate_limit = [{{ average = 6, period = "1m", burst = 6, key = "route", store = "redis" }}]
        """


async def test_two_proxies_share_one_limit(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_redis() as redis:
        config = write_config(tmp_path, "t.toml", config_text(upstream, redis.url))
        async with front_end("--config", config) as one, front_end("--config", config) as two:
            # 12 requests, alternating: each proxy alone would pass 6.
            statuses = [await status_of(proxy) for _ in range(6) for proxy in (one, two)]
            assert Counter(statuses) == {200: 6, 429: 6}, statuses
            assert statuses[:6] == [200] * 6
            rejected = [
                (await admin_status(p))["limits"]["routes"]["shared"]["rejected"]
                for p in (one, two)
            ]
            assert rejected == [3, 3]
            assert (await admin_status(one))["limits"]["redis"]["store_errors"] == 0


async def test_redis_down_allow_passes_and_counts(tmp_path: Path, nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_redis() as redis:
        config = write_config(tmp_path, "t.toml", config_text(upstream, redis.url, "allow"))
        async with run_proxy("--config", config) as proxy:
            assert await status_of(proxy) == 200
            await redis.stop()
            # Over the limit of 6 and still passing: Redis cannot count them.
            assert [await status_of(proxy) for _ in range(10)] == [200] * 10
            status = await admin_status(proxy)
            assert status["limits"]["redis"]["store_errors"] == 10
            metrics = await admin_scrape(proxy)
            assert metrics.value("trioproxy_ratelimit_store_errors_total") == 10
            assert status["limits"]["redis"]["healthy"] is False
            log = await proxy.settled_stderr()
            assert log.count("rate limit store") == 1, log
            assert "allowing the requests it cannot check" in log
            # Back (empty): the next request that tries it finds it, and counting
            # starts again, so 7 more go over the limit of 6.
            await redis.start()
            with trio.fail_after(15):
                while "recovered (" not in proxy.stderr():
                    assert await status_of(proxy) == 200
                    await trio.sleep(0.1)
            statuses = [await status_of(proxy) for _ in range(7)]
            assert statuses[-1] == 429, statuses


async def test_redis_down_deny_answers_503(tmp_path: Path, nursery: trio.Nursery) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with run_redis() as redis:
        config = write_config(tmp_path, "t.toml", config_text(upstream, redis.url, "deny"))
        async with run_proxy("--config", config) as proxy:
            assert await status_of(proxy) == 200
            redis.pause()  # stalled, not gone: each check gives up after the timeout
            raw = await raw_request(
                proxy.host, proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            assert raw.startswith(b"HTTP/1.1 503 "), raw
            assert b"\r\nretry-after: 1\r\n" in raw.lower()
            assert [await status_of(proxy) for _ in range(3)] == [503] * 3
            log = await proxy.settled_stderr()
            assert "denying (503) the requests it cannot check" in log
            assert (await admin_status(proxy))["limits"]["redis"]["store_errors"] == 4
            redis.resume()
