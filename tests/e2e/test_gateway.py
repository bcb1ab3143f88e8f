"""The gateway through the real CLI: ``python -m trioproxy --config FILE``.

Routes by host, path (exact, prefix, regex), method and header; path rewrites and
header rules as the upstream sees them, byte for byte; CORS; ``respond`` routes; 404
when nothing matches; body transforms; per-route body limits. The upstreams are real
servers on 127.0.0.1 (``upstream_app`` echoes what it received).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from e2e.conftest import CannedUpstream
from fixtures import raw_request, run_proxy

pytestmark = pytest.mark.timeout(30)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trioproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def echoed(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    return json.loads(response.text)  # type: ignore[no-any-return]


def header_list(echo: dict[str, object]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in echo["headers"]]  # type: ignore[attr-defined]


async def test_routes_match_on_host_path_method_and_header(
    tmp_path: Path,
    named_upstream: Callable[[str], Awaitable[str]],
    http_client: httpx.AsyncClient,
) -> None:
    names = ["exact", "prefix", "longer", "regex", "host", "wild", "post", "tenant", "other"]
    urls = {name: await named_upstream(name) for name in names}
    groups = "".join(f'[upstreams.{n}]\nservers = ["{u}"]\n' for n, u in urls.items())
    config = write_config(
        tmp_path,
        groups
        + """
        [routes.exact]
        upstream = "exact"
        match = { path = "/api/items" }
        [routes.prefix]
        upstream = "prefix"
        match = { path_prefix = "/api/" }
        [routes.longer]
        upstream = "longer"
        match = { path_prefix = "/api/items/" }
        [routes.regex]
        upstream = "regex"
        match = { path_regex = "^/v[0-9]+/things$" }
        [routes.host]
        upstream = "host"
        match = { host = ["api.example.com"] }
        [routes.wild]
        upstream = "wild"
        match = { host = ["*.example.org"] }
        [routes.post]
        upstream = "post"
        match = { path_prefix = "/form", methods = ["POST"] }
        [routes.tenant]
        upstream = "tenant"
        match = { path_prefix = "/form", headers = { "x-tenant" = "blue" } }
        [routes.other]
        upstream = "other"
        match = { path_prefix = "/form" }
        """,
    )
    async with run_proxy("--config", config) as proxy:
        base = proxy.url

        async def who(method: str, path: str, **headers: str) -> str:
            response = await http_client.request(method, base + path, headers=headers)
            assert response.status_code == 200, (path, response.status_code, response.text)
            return response.text

        assert await who("GET", "/api/items") == "exact"
        assert await who("GET", "/api/items/7") == "longer"
        assert await who("GET", "/api/other") == "prefix"
        assert await who("GET", "/v2/things") == "regex"
        assert await who("GET", "/x", host="api.example.com") == "host"
        assert await who("GET", "/x", host="a.b.example.org") == "wild"
        # A host route is tried before a path route, as nginx picks a server first.
        assert await who("GET", "/api/items", host="api.example.com") == "host"
        assert await who("POST", "/form") == "post"
        assert await who("GET", "/form", **{"x-tenant": "blue"}) == "tenant"
        assert await who("GET", "/form") == "other"
        response = await http_client.get(base + "/nothing/here")
        assert response.status_code == 404
        assert response.text == "404 Not Found: no route for this request\n"
        # The access log names the route.
        log = await proxy.wait_for_stderr("route=regex")
        assert "GET /v2/things" in log


async def test_rewrites_reach_the_upstream_byte_exact(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path,
        f"""
        [upstreams.api]
        servers = ["{upstream}"]
        [routes.users]
        upstream = "api"
        match = {{ path_prefix = "/users" }}
        rewrite = {{ strip_prefix = "/users", add_prefix = "/echo/v1" }}
        [routes.old]
        upstream = "api"
        match = {{ path_prefix = "/old" }}
        rewrite = {{ regex = "^/old/(.*)$", replacement = "/echo/new/\\\\1" }}
        [routes.mapped]
        upstream = "api"
        match = {{ path = "/accounts" }}
        rewrite = {{ paths = {{ "/accounts" = "/echo/accounts-v2" }} }}
        """,
    )
    async with run_proxy("--config", config) as proxy:
        host, port = proxy.host, proxy.port
        odd_query = b"?a=%2F&b=;x&&c="
        response = await raw_request(
            host, port, b"GET /users/7%2F8" + odd_query + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        echo = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert echo["target"] == "/echo/v1/7%2F8" + odd_query.decode()
        assert ("x-forwarded-prefix", "/users") in header_list(echo)

        echo = echoed(await http_client.get(proxy.url + "/old/a/b?q=1"))
        assert echo["target"] == "/echo/new/a/b?q=1"
        echo = echoed(await http_client.get(proxy.url + "/accounts?z"))
        assert echo["target"] == "/echo/accounts-v2?z"


async def test_header_rules_on_requests_and_responses(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient
) -> None:
    client_template = "{client_ip} {route} {upstream} {{literal}}"
    config = write_config(
        tmp_path,
        f"""
        [server]
        headers = {{ response_set = {{ "X-Proxy-By" = "trioproxy" }} }}
        [upstreams.api]
        servers = ["{upstream}"]
        [routes.echo]
        upstream = "api"
        match = {{ path_prefix = "/echo" }}
        [routes.echo.headers]
        request_set = {{ "X-Gateway" = "trioproxy", "X-Client" = "{client_template}" }}
        request_add = {{ "X-Seen" = "{{method}} {{path}}" }}
        request_remove = ["x-internal"]
        response_set = {{ "X-Process-Time" = "{{process_time}}" }}
        response_remove = ["server"]
        """,
    )
    async with run_proxy("--config", config) as proxy:
        response = await http_client.get(
            proxy.url + "/echo/here?q=1",
            headers={"x-internal": "secret", "x-seen": "client", "x-gateway": "spoofed"},
        )
        echo = echoed(response)
        headers = header_list(echo)
        assert ("x-gateway", "trioproxy") in headers
        assert ("x-gateway", "spoofed") not in headers
        assert ("x-client", "127.0.0.1 echo api {literal}") in headers
        assert [v for n, v in headers if n == "x-seen"] == ["client", "GET /echo/here"]
        assert not [n for n, _ in headers if n == "x-internal"]
        assert response.headers["x-proxy-by"] == "trioproxy"
        assert "server" not in response.headers
        process_time = float(response.headers["x-process-time"])
        assert 0 <= process_time < 5
        assert len(response.headers["x-process-time"].split(".")[1]) == 3


async def test_cors_preflight_is_answered_by_the_proxy(
    tmp_path: Path,
    canned_upstream: Callable[[bytes], Awaitable[CannedUpstream]],
    http_client: httpx.AsyncClient,
) -> None:
    canned = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    config = write_config(
        tmp_path,
        f"""
        [upstreams.api]
        servers = ["{canned.url}"]
        health = false
        [routes.api]
        upstream = "api"
        [routes.api.cors]
        allow_origins = ["https://app.example.com"]
        allow_methods = ["GET", "POST"]
        allow_headers = ["authorization"]
        expose_headers = ["x-request-id"]
        allow_credentials = true
        max_age = 600
        """,
    )
    async with run_proxy("--config", config) as proxy:
        preflight = await http_client.options(
            proxy.url + "/things",
            headers={
                "origin": "https://app.example.com",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert preflight.headers["access-control-max-age"] == "600"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "origin" in preflight.headers["vary"].lower()
        assert canned.connections == 0

        actual = await http_client.get(
            proxy.url + "/things", headers={"origin": "https://app.example.com"}
        )
        assert actual.text == "ok"
        assert actual.headers["access-control-allow-origin"] == "https://app.example.com"
        assert actual.headers["access-control-expose-headers"].lower() == "x-request-id"

        foreign = await http_client.get(
            proxy.url + "/things", headers={"origin": "https://evil.example"}
        )
        assert foreign.text == "ok"
        assert "access-control-allow-origin" not in foreign.headers


async def test_respond_routes_and_route_body_limits(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path,
        f"""
        [server]
        max_body_size = 100
        [upstreams.api]
        servers = ["{upstream}"]
        [routes.ping]
        match = {{ path = "/api/ping" }}
        respond = {{ status = 200, body = "pong", content_type = "text/plain" }}
        [routes.upload]
        upstream = "api"
        match = {{ path = "/upload" }}
        max_body_size = 1000
        [routes.rest]
        upstream = "api"
        """,
    )
    async with run_proxy("--config", config) as proxy:
        pong = await http_client.get(proxy.url + "/api/ping")
        assert (pong.status_code, pong.text) == (200, "pong")
        assert pong.headers["content-type"] == "text/plain"
        assert pong.headers["x-request-id"]
        # The route raises the server's limit of 100 for itself...
        upload = await http_client.post(proxy.url + "/upload", content=b"x" * 500)
        assert upload.status_code == 200 and upload.json()["len"] == 500
        too_big = await http_client.post(proxy.url + "/upload", content=b"x" * 1001)
        assert too_big.status_code == 413
        # ...and the server's stays on the others.
        other = await http_client.post(proxy.url + "/echo", content=b"x" * 101)
        assert other.status_code == 413


async def test_body_transform_rewrites_the_request_body(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient
) -> None:
    (tmp_path / "gw_transforms.py").write_text(
        textwrap.dedent(
            """
            import json

            async def add_tenant(body: bytes, content_type: str) -> bytes:
                data = json.loads(body)
                data["tenant"] = "blue"
                return json.dumps(data).encode()

            def broken(body, content_type):
                raise RuntimeError("no")
            """
        )
    )
    config = write_config(
        tmp_path,
        f"""
        [upstreams.api]
        servers = ["{upstream}"]
        [routes.tenant]
        upstream = "api"
        match = {{ path = "/upload" }}
        body_transform = "gw_transforms:add_tenant"
        body_transform_limit = 1000
        [routes.broken]
        upstream = "api"
        match = {{ path = "/echo" }}
        body_transform = "gw_transforms:broken"
        """,
    )
    import hashlib

    expected = json.dumps({"a": 1, "tenant": "blue"}).encode()
    async with run_proxy("--config", config, env={"PYTHONPATH": str(tmp_path)}) as proxy:
        response = await http_client.post(proxy.url + "/upload", json={"a": 1})
        assert response.status_code == 200
        assert response.json() == {
            "len": len(expected),
            "sha256": hashlib.sha256(expected).hexdigest(),
        }
        too_big = await http_client.post(proxy.url + "/upload", content=b"[" * 1001)
        assert too_big.status_code == 413
        failed = await http_client.post(proxy.url + "/echo", content=b"{}")
        assert failed.status_code == 500
        assert "Traceback" not in failed.text
        log = await proxy.wait_for_stderr("gw_transforms:broken")
        assert "RuntimeError" in log


async def test_websocket_upgrades_are_routed_and_rewritten(tmp_path: Path, upstream: str) -> None:
    config = write_config(
        tmp_path,
        f"""
        [upstreams.app]
        servers = ["{upstream}"]
        [routes.ws]
        upstream = "app"
        match = {{ path_prefix = "/socket" }}
        rewrite = {{ strip_prefix = "/socket", add_prefix = "/ws" }}
        [routes.rest]
        match = {{ path_prefix = "/" }}
        respond = {{ status = 404, body = "nope" }}
        """,
    )
    async with run_proxy("--config", config) as proxy:
        ws_url = proxy.url.replace("http://", "ws://") + "/socket"
        async with trio_websocket.open_websocket_url(ws_url) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
        # Other paths take the other route.
        response = await raw_request(proxy.host, proxy.port, b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 404") and response.endswith(b"nope")


async def test_reload_applies_a_good_config_and_refuses_a_bad_one(
    tmp_path: Path,
    named_upstream: Callable[[str], Awaitable[str]],
    http_client: httpx.AsyncClient,
) -> None:
    import signal

    a, b = await named_upstream("A"), await named_upstream("B")

    def route_to(url: str, extra: str = "") -> str:
        return f'[upstreams.g]\nservers = ["{url}"]\n[routes.r]\nupstream = "g"\n{extra}'

    config = write_config(tmp_path, route_to(a))
    async with run_proxy("--config", config) as proxy:
        assert (await http_client.get(proxy.url + "/")).text == "A"
        await trio.Path(config).write_text(route_to(b))
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for_stderr("config reloaded (generation 2)")
        assert (await http_client.get(proxy.url + "/")).text == "B"
        # A bad config changes nothing, and says why in one line.
        await trio.Path(config).write_text(route_to(a, 'match = { path_prefix = "nope" }\n'))
        proxy.process.send_signal(signal.SIGHUP)
        log = await proxy.wait_for_stderr("reload refused")
        assert "routes.r.match.path_prefix" in log
        assert (await http_client.get(proxy.url + "/")).text == "B"
        assert "Traceback" not in proxy.stderr()
