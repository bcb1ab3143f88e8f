"""Prometheus metrics through the real CLI (and, for the cases that take
``front_end``, the ASGI app under hypercorn), read as Prometheus reads them.

``/metrics`` on the admin listener, on the proxy's port (``metrics_path``) and
through a ``handler = "metrics"`` route; parsed with ``prometheus_client.parser``.
The upstreams are real servers on 127.0.0.1.
"""

from __future__ import annotations

import re
import signal
import socket
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
import upstream_app
from e2e.conftest import FrontEnd
from e2e.metrics_helpers import Scrape, parse, scrape, scrape_when
from fixtures import ProxyProcess, run_proxy, serve_asgi

pytestmark = pytest.mark.timeout(60)

#: Every family of issue 14, as the parser names them (a counter without ``_total``).
FAMILIES = {
    "trioproxy_requests",
    "trioproxy_request_duration_seconds",
    "trioproxy_time_to_first_byte_seconds",
    "trioproxy_upstream_server_up",
    "trioproxy_upstream_breaker_state",
    "trioproxy_upstream_requests_in_flight",
    "trioproxy_upstream_connections",
    "trioproxy_retries",
    "trioproxy_open_connections",
    "trioproxy_websocket_tunnels",
    "trioproxy_request_bytes",
    "trioproxy_response_bytes",
    "trioproxy_config_reloads",
    "trioproxy_config_last_reload_success_timestamp_seconds",
    "trioproxy_llm_time_to_first_token_seconds",
    "trioproxy_llm_time_per_output_token_seconds",
    "trioproxy_llm_output_tokens_per_second",
    "trioproxy_llm_tokens",
    "trioproxy_llm_requests",
    "trioproxy_llm_usage_missing",
    "time_to_first_byte_seconds",
    "request_duration_seconds",
}

_ADMIN = re.compile(r"admin listening on (http://[\d.]+:\d+)")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


async def admin_url(proxy: ProxyProcess) -> str:
    with trio.fail_after(10):
        log = await proxy.wait_for_stderr("admin listening on")
    match = _ADMIN.search(log)
    assert match is not None
    return match.group(1)


async def wait_for(
    client: httpx.AsyncClient, url: str, check: str, predicate: object, within: float = 15
) -> Scrape:
    """Scrape until ``predicate(scrape)`` holds (``check`` names it for the failure)."""
    assert callable(predicate)
    last: Scrape | None = None
    with trio.move_on_after(within):
        while True:
            last = await scrape(client, url)
            if predicate(last):
                return last
            await trio.sleep(0.1)
    raise AssertionError(f"not within {within} s: {check}; last scrape: {last}")


def gateway_config(tmp_path: Path, api: list[str], other: str, broken: str) -> str:
    servers = ", ".join(f'"{url}"' for url in api)
    return write(
        tmp_path / "trioproxy.toml",
        f"""
        [server]
        metrics_path = "/metrics"
        admin = {{ host = "127.0.0.1", port = 0 }}
        metrics_buckets = [0.005, 0.05, "500ms", "5m"]

        [upstreams.api]
        servers = [{servers}]
        health = {{ path = "/", interval = "100ms", timeout = "1s", rise = 1, fall = 1 }}
        passive = {{ eject_after = 0 }}

        [upstreams.other]
        servers = ["{other}"]
        health = false

        [upstreams.broken]
        servers = ["{broken}"]
        health = false
        passive = {{ eject_after = 0 }}
        retry = {{ attempts = 0 }}
        breaker = {{ failures = 2, window = "30s", open_for = "60s" }}

        [routes.api]
        upstream = "api"
        match = {{ path_prefix = "/api/" }}
        rewrite = {{ strip_prefix = "/api" }}

        [routes.other]
        upstream = "other"
        match = {{ path_prefix = "/other/" }}
        rewrite = {{ strip_prefix = "/other" }}

        [routes.broken]
        upstream = "broken"
        match = {{ path_prefix = "/broken/" }}

        [routes.scrape]
        handler = "metrics"
        match = {{ path = "/internal/metrics" }}
        """,
    )


async def test_counts_labels_and_live_gauges(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    stop_api_b = trio.Event()
    api_a = await serve_asgi(upstream_app.app, nursery)
    api_b = await serve_asgi(upstream_app.app, nursery, shutdown_trigger=stop_api_b.wait)
    other = await serve_asgi(upstream_app.app, nursery)
    broken = f"http://127.0.0.1:{closed_port()}"
    config = gateway_config(tmp_path, [api_a, api_b], other, broken)
    async with front_end("--config", config, health_check=True) as proxy:
        metrics = f"{proxy.url}/metrics"
        admin = await admin_url(proxy)
        for _ in range(6):
            assert (await http_client.get(f"{proxy.url}/api/")).status_code == 200
        for _ in range(3):
            response = await http_client.post(f"{proxy.url}/api/upload", content=b"x" * 1000)
            assert response.status_code == 200
        for _ in range(2):
            assert (await http_client.get(f"{proxy.url}/api/status/503")).status_code == 503
        assert (await http_client.get(f"{proxy.url}/other/nothing")).status_code == 404
        assert (await http_client.request("PROPFIND", f"{proxy.url}/other/")).status_code == 200
        assert (await http_client.get(f"{proxy.url}/nowhere")).status_code == 404
        for _ in range(3):
            assert (await http_client.get(f"{proxy.url}/broken/")).status_code in (502, 503)

        before = await scrape(http_client, metrics)
        # Every family of the issue is exposed (the LLM ones without samples until an
        # LLM request: tests/e2e/test_llm_meter.py checks those).
        assert before.families >= FAMILIES, FAMILIES - before.families
        with_samples = {name for name, _ in before.samples}
        # The ASGI server owns the connections and does not report them to the app:
        # trioproxy_open_connections has no sample there (rather than a wrong one).
        standalone = front_end is run_proxy
        uncounted = set() if standalone else {"trioproxy_open_connections"}
        for family in FAMILIES - {f for f in FAMILIES if "_llm_" in f} - uncounted:
            assert any(name.startswith(family) for name in with_samples), family
        # Counts match the requests sent, per route, method and code.
        assert (
            before.value(
                "trioproxy_requests_total", route="api", upstream="api", method="GET", code="200"
            )
            == 6
        )
        assert (
            before.value(
                "trioproxy_requests_total", route="api", upstream="api", method="POST", code="200"
            )
            == 3
        )
        assert (
            before.value(
                "trioproxy_requests_total", route="api", upstream="api", method="GET", code="503"
            )
            == 2
        )
        assert (
            before.value(
                "trioproxy_requests_total",
                route="other",
                upstream="other",
                method="GET",
                code="404",
            )
            == 1
        )
        # A method outside the standard set is "other".
        assert (
            before.value(
                "trioproxy_requests_total",
                route="other",
                upstream="other",
                method="other",
                code="200",
            )
            == 1
        )
        # No route took it: route="".
        assert (
            before.value(
                "trioproxy_requests_total", route="", upstream="", method="GET", code="404"
            )
            == 1
        )
        assert (
            before.value("trioproxy_request_duration_seconds_count", route="api", upstream="api")
            == 11
        )
        assert (
            before.value("trioproxy_time_to_first_byte_seconds_count", route="api", upstream="api")
            == 11
        )
        assert before.value("trioproxy_request_bytes_total", route="api") == 3000
        assert before.value("trioproxy_response_bytes_total", route="api") > 0
        # The configured buckets.
        bounds = {
            dict(labels)["le"]
            for labels in before.matching("trioproxy_request_duration_seconds_bucket", route="api")
        }
        assert bounds == {"0.005", "0.05", "0.5", "300.0", "+Inf"}
        # The seed's families: by server URL, endpoint = the route's name.
        seed = before.matching("request_duration_seconds_count", endpoint="api")
        assert sum(seed.values()) == 11
        assert {dict(labels)["url"] for labels in seed} <= {api_a, api_b}
        # Gauges read from live objects.
        assert before.value("trioproxy_upstream_server_up", upstream="api", server=api_b) == 1
        if standalone:
            assert before.value("trioproxy_open_connections", listener="proxy") >= 1
        else:
            assert not before.matching("trioproxy_open_connections")
        assert before.value("trioproxy_websocket_tunnels", route="api") == 0
        assert before.value("trioproxy_upstream_connections", upstream="api", state="idle") >= 1
        assert (
            before.value("trioproxy_upstream_requests_in_flight", upstream="api", server=api_a) == 0
        )
        # The breaker of the server that refuses connections opened after 2 failures.
        assert (
            before.value("trioproxy_upstream_breaker_state", upstream="broken", server=broken) == 2
        )
        assert before.value("trioproxy_upstream_breaker_state", upstream="api", server=api_a) == 0

        # 1,000 requests to random paths add no series.
        async with trio.open_nursery() as clients:
            for worker in range(10):

                async def burst(worker: int = worker) -> None:
                    for _ in range(100):
                        path = f"/api/{uuid.uuid4().hex}?k={uuid.uuid4().hex}"
                        response = await http_client.get(f"{proxy.url}{path}")
                        assert response.status_code == 404

                clients.start_soon(burst)
        # Counted at each exchange's end, a moment after the client has its answer.
        after = await scrape_when(
            http_client,
            metrics,
            lambda s: (
                s.get(
                    "trioproxy_requests_total",
                    route="api",
                    upstream="api",
                    method="GET",
                    code="404",
                )
                >= 1000
            ),
        )
        assert (
            after.value(
                "trioproxy_requests_total", route="api", upstream="api", method="GET", code="404"
            )
            == 1000
        )
        new = set(after.samples) - set(before.samples)
        # The one (route=api, GET, 404) series, and the scrapes of metrics_path
        # (answered without a route: route="").
        assert new <= {
            ("trioproxy_requests_total", frozenset(labels.items()))
            for labels in (
                {"route": "api", "upstream": "api", "method": "GET", "code": "404"},
                {"route": "", "upstream": "", "method": "GET", "code": "200"},
            )
        }, new

        # The same registry on the admin listener and through the handler route.
        on_admin = await scrape(http_client, f"{admin}/metrics")
        via_route = await scrape(http_client, f"{proxy.url}/internal/metrics")
        for other_scrape in (on_admin, via_route):
            assert (
                other_scrape.value(
                    "trioproxy_requests_total",
                    route="api",
                    upstream="api",
                    method="GET",
                    code="404",
                )
                == 1000
            )

        # Kill a server: its server_up flips to 0.
        stop_api_b.set()
        await wait_for(
            http_client,
            metrics,
            "server_up of the stopped server is 0",
            lambda s: s.get("trioproxy_upstream_server_up", 1, upstream="api", server=api_b) == 0,
        )


async def test_reload_drops_removed_routes_and_counts_reloads(
    tmp_path: Path, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    api = await serve_asgi(upstream_app.app, nursery)
    other = await serve_asgi(upstream_app.app, nursery)
    broken = f"http://127.0.0.1:{closed_port()}"
    config = gateway_config(tmp_path, [api], other, broken)
    async with run_proxy("--config", config) as proxy:
        metrics = f"{proxy.url}/metrics"
        assert (await http_client.get(f"{proxy.url}/api/")).status_code == 200
        assert (await http_client.get(f"{proxy.url}/other/")).status_code == 200
        first = await scrape(http_client, metrics)
        assert first.matching("trioproxy_requests_total", route="other")
        stamp = first.value("trioproxy_config_last_reload_success_timestamp_seconds")

        # A bad config: counted as a failure, nothing else changes.
        path = trio.Path(config)
        good = await path.read_text()
        await path.write_text(good + "\n[routes.bad]\nupstream = 'missing'\n")
        proxy.process.send_signal(signal.SIGHUP)
        failed = await wait_for(
            http_client,
            metrics,
            "a failed reload counted",
            lambda s: s.get("trioproxy_config_reloads_total", result="failure") == 1,
        )
        assert failed.matching("trioproxy_requests_total", route="other")

        # The route "other" removed: its series go, the others stay.
        without_other = re.sub(
            r"\[routes\.other\].*?(?=\[routes\.broken\])", "", good, flags=re.DOTALL
        )
        assert "[routes.other]" not in without_other
        # New buckets too: a restart applies those, and the log says so.
        without_other = without_other.replace('"500ms", "5m"', '"1s"')
        await path.write_text(without_other)
        proxy.process.send_signal(signal.SIGHUP)
        reloaded = await wait_for(
            http_client,
            metrics,
            "a good reload counted",
            lambda s: s.get("trioproxy_config_reloads_total", result="success") == 1,
        )
        assert not [key for key in reloaded.samples if ("route", "other") in key[1]]
        assert (
            reloaded.value(
                "trioproxy_requests_total", route="api", upstream="api", method="GET", code="200"
            )
            == 1
        )
        assert reloaded.value("trioproxy_config_last_reload_success_timestamp_seconds") > stamp
        bounds = {
            dict(labels)["le"]
            for labels in reloaded.matching(
                "trioproxy_request_duration_seconds_bucket", route="api"
            )
        }
        assert bounds == {"0.005", "0.05", "0.5", "300.0", "+Inf"}
        with trio.fail_after(5):
            await proxy.wait_for_stderr("are taken at start; a restart applies the new ones")
        assert (await http_client.get(f"{proxy.url}/other/")).status_code == 404


async def test_backend_url_cli_serves_the_seed_families(
    front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    """Seed 002's command line: ``--backend-url URL --host H --port P --metrics-path
    /metrics`` serves its two families with its buckets."""
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with front_end("--backend-url", upstream, "--metrics-path", "/metrics") as proxy:
        for _ in range(4):
            assert (await http_client.get(f"{proxy.url}/echo")).status_code == 200
        text = (await http_client.get(f"{proxy.url}/metrics")).text
    result = parse(text)
    assert {"time_to_first_byte_seconds", "request_duration_seconds"} <= result.families
    ttfb = result.matching("time_to_first_byte_seconds_bucket", url=upstream, endpoint="default")
    assert sorted(float(dict(k)["le"]) for k in ttfb) == [
        0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, float("inf")
    ]  # fmt: skip
    assert max(ttfb.values()) == 4
    duration = result.matching("request_duration_seconds_bucket", url=upstream, endpoint="default")
    assert sorted(float(dict(k)["le"]) for k in duration) == [
        0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, float("inf")
    ]  # fmt: skip
    assert result.value("request_duration_seconds_count", url=upstream, endpoint="default") == 4


async def test_metrics_off(
    front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    upstream = await serve_asgi(upstream_app.app, nursery)
    async with front_end(
        "--upstream", upstream, "--metrics-path", "/metrics", "--no-metrics"
    ) as proxy:
        assert (await http_client.get(f"{proxy.url}/")).status_code == 200
        response = await http_client.get(f"{proxy.url}/metrics")
    assert response.status_code == 404
    assert "metrics are off" in response.text


async def test_retries_and_websocket_tunnels_are_counted(
    tmp_path: Path, front_end: FrontEnd, nursery: trio.Nursery, http_client: httpx.AsyncClient
) -> None:
    good = await serve_asgi(upstream_app.app, nursery)
    refused = f"http://127.0.0.1:{closed_port()}"
    config = write(
        tmp_path / "trioproxy.toml",
        f"""
        [server]
        metrics_path = "/metrics"
        [upstreams.api]
        servers = ["{refused}", "{good}"]
        health = false
        passive = {{ eject_after = 0 }}
        breaker = {{ failures = 0 }}
        retry = {{ attempts = 1, budget = 1.0 }}
        [routes.api]
        upstream = "api"
        """,
    )
    async with front_end("--config", config) as proxy:
        # Round robin: one of every two requests tries the refusing server first,
        # then goes to the other.
        for _ in range(4):
            assert (await http_client.get(f"{proxy.url}/")).status_code == 200
        ws_url = proxy.url.replace("http://", "ws://") + "/ws"
        async with trio_websocket.open_websocket_url(ws_url) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            during = await scrape(http_client, f"{proxy.url}/metrics")
        # The tunnel's end is the proxy's to see, just after the client's close.
        await wait_for(
            http_client,
            f"{proxy.url}/metrics",
            "the closed tunnel is no longer counted",
            lambda s: s.get("trioproxy_websocket_tunnels", -1, route="api") == 0,
            within=5,
        )
    assert during.value("trioproxy_retries_total", route="api", upstream="api") == 2
    assert during.value("trioproxy_websocket_tunnels", route="api") == 1
