"""Real client identity and access rules through the real CLI (``--config FILE``), and
the cases that take ``front_end`` through the ASGI app under hypercorn as well.

The peer of the proxy is always 127.0.0.1 here; ``trusted_proxies`` includes it or
not to show both sides. The upstream is ``upstream_app`` (``/echo`` returns what it
received) and counts what reaches it, so that a refused request is seen not to.
"""

from __future__ import annotations

import json
import signal
import socket
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from e2e.conftest import CannedUpstream, FrontEnd
from fixtures import run_proxy

pytestmark = pytest.mark.timeout(30)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trioproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def echo_headers(response: httpx.Response, name: str) -> list[str]:
    assert response.status_code == 200, response.text
    return [v for n, v in json.loads(response.text)["headers"] if n == name]


IDENTITY = """\
[server]
trusted_proxies = {trusted}
forwarded = "both"
[server.headers]
request_set = {{ "X-Client" = "{{client_ip}}" }}
[upstreams.default]
servers = ["{upstream}"]
"""


async def test_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(
    tmp_path: Path, front_end: FrontEnd, upstream: str, http_client: httpx.AsyncClient
) -> None:
    config = write_config(tmp_path, IDENTITY.format(trusted='["10.0.0.0/8"]', upstream=upstream))
    spoof = {"x-forwarded-for": "6.6.6.6", "forwarded": "for=6.6.6.6"}
    async with front_end("--config", config) as proxy:
        response = await http_client.get(proxy.url + "/echo", headers=spoof)
        log = await proxy.settled_stderr()
    assert echo_headers(response, "x-client") == ["127.0.0.1"]
    assert echo_headers(response, "x-forwarded-for") == ["127.0.0.1"]
    host = f"127.0.0.1:{proxy.port}"
    assert echo_headers(response, "forwarded") == [f'for=127.0.0.1;host="{host}";proto=http']
    access = [line for line in log.splitlines() if '"GET /echo' in line]
    assert access and access[0].split("trioproxy.access: ")[1].startswith("127.0.0.1 ")
    assert "6.6.6.6" not in log


async def test_forwarded_for_from_a_trusted_peer_is_honoured(
    tmp_path: Path, front_end: FrontEnd, upstream: str, http_client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path, IDENTITY.format(trusted='["127.0.0.1/32", "10.0.0.0/8"]', upstream=upstream)
    )
    chain = {"x-forwarded-for": "6.6.6.6, 2001:db8::7, 10.1.1.1"}
    async with front_end("--config", config) as proxy:
        response = await http_client.get(proxy.url + "/echo", headers=chain)
        log = await proxy.settled_stderr()
    assert echo_headers(response, "x-client") == ["2001:db8::7"]
    # The spoofable part left of the client is cut; the peer is the last hop.
    assert echo_headers(response, "x-forwarded-for") == ["2001:db8::7, 10.1.1.1, 127.0.0.1"]
    host = f"127.0.0.1:{proxy.port}"
    assert echo_headers(response, "forwarded") == [
        f'for="[2001:db8::7]", for=10.1.1.1, for=127.0.0.1;host="{host}";proto=http'
    ]
    access = [line for line in log.splitlines() if '"GET /echo' in line]
    assert access and access[0].split("trioproxy.access: ")[1].startswith("2001:db8::7 ")


async def test_proto_and_host_from_a_trusted_peer_go_upstream(
    tmp_path: Path, front_end: FrontEnd, upstream: str, http_client: httpx.AsyncClient
) -> None:
    """Behind a TLS-terminating balancer the app must see https and the public
    host (to build its links); from anyone else the proxy's own view goes."""
    edge = {"x-forwarded-proto": "https", "x-forwarded-host": "app.example"}
    for trusted, proto, host in (
        ('["127.0.0.1/32"]', "https", "app.example"),
        ('["10.0.0.0/8"]', "http", None),
    ):
        config = write_config(tmp_path, IDENTITY.format(trusted=trusted, upstream=upstream))
        async with front_end("--config", config) as proxy:
            response = await http_client.get(proxy.url + "/echo", headers=edge)
            # A WebSocket upgrade is told the same.
            async with trio_websocket.open_websocket_url(
                proxy.url.replace("http://", "ws://") + "/ws/headers",
                extra_headers=[(b"x-forwarded-proto", b"https")],
            ) as ws:
                ws_headers = json.loads(await ws.get_message())
        assert echo_headers(response, "x-forwarded-proto") == [proto]
        assert echo_headers(response, "x-forwarded-host") == [host or f"127.0.0.1:{proxy.port}"]
        assert [v for n, v in ws_headers if n == "x-forwarded-proto"] == [proto]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_forwarded_quotes_an_ipv6_peer(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path,
        f"""\
        [server]
        forwarded = "rfc7239"
        [upstreams.default]
        servers = ["{upstream}"]
        """,
    )
    async with run_proxy("--config", config, "--host", "::1") as proxy:
        response = await http_client.get(f"http://[::1]:{proxy.port}/echo")
    assert echo_headers(response, "forwarded") == [
        f'for="[::1]";host="[::1]:{proxy.port}";proto=http'
    ]
    assert echo_headers(response, "x-forwarded-for") == []
    assert echo_headers(response, "x-forwarded-proto") == []


ACCESS = """\
[upstreams.echo]
servers = ["{upstream}"]
[upstreams.canned]
servers = ["{canned}"]
[routes.open]
upstream = "echo"
[routes.lan]
upstream = "canned"
match = {{ path_prefix = "/lan" }}
allow = ["10.0.0.0/8"]
[routes.blocked]
upstream = "canned"
match = {{ path_prefix = "/blocked" }}
deny = ["127.0.0.0/8"]
[routes.keyed]
upstream = "canned"
match = {{ path_prefix = "/keyed" }}
auth = {{ api_keys_file = "keys.txt" }}
[routes.header]
upstream = "echo"
match = {{ path_prefix = "/header" }}
rewrite = {{ strip_prefix = "/header" }}
auth = {{ api_keys_env = "EDGE_TEST_KEYS", header = "x-api-key", forward_key = true }}
"""

CANNED = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"


async def test_allow_deny_and_api_keys(
    tmp_path: Path,
    front_end: FrontEnd,
    upstream: str,
    canned_upstream: Callable[[bytes], Awaitable[CannedUpstream]],
    http_client: httpx.AsyncClient,
) -> None:
    canned = await canned_upstream(CANNED)
    (tmp_path / "keys.txt").write_text("sk-live-0123456789\nsk-live-second\n")
    config = write_config(tmp_path, ACCESS.format(upstream=upstream, canned=canned.url))
    env = {"EDGE_TEST_KEYS": "hk-abcdef-42"}
    async with front_end("--config", config, env=env) as proxy:
        url = proxy.url
        open_ = await http_client.get(url + "/echo")
        lan = await http_client.get(url + "/lan")
        blocked = await http_client.get(url + "/blocked")
        missing = await http_client.get(url + "/keyed")
        wrong = await http_client.get(
            url + "/keyed", headers={"authorization": "Bearer sk-live-wrong-key"}
        )
        good = await http_client.get(
            url + "/keyed/good", headers={"authorization": "Bearer sk-live-second"}
        )
        header_good = await http_client.get(
            url + "/header/echo", headers={"x-api-key": "hk-abcdef-42"}
        )
        header_missing = await http_client.get(url + "/header/echo")
        log = await proxy.settled_stderr()
    assert open_.status_code == 200
    assert (lan.status_code, blocked.status_code) == (403, 403)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="trioproxy"'
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="trioproxy", error="invalid_token"'
    assert (good.status_code, good.text) == (200, "ok")
    # Refused requests never reached the upstream; the good one did, without its key.
    assert len(canned.heads) == 1, canned.heads
    assert canned.heads[0].startswith(b"GET /keyed/good ")
    assert b"authorization" not in canned.heads[0].lower()
    assert b"sk-live" not in canned.heads[0]
    # forward_key = true sends it on.
    assert echo_headers(header_good, "x-api-key") == ["hk-abcdef-42"]
    assert header_missing.status_code == 401
    assert header_missing.headers["www-authenticate"] == (
        'ApiKey realm="trioproxy", header="x-api-key"'
    )
    for secret in ("sk-live-0123456789", "sk-live-second", "sk-live-wrong-key", "hk-abcdef-42"):
        assert secret not in log, log
    statuses = [line for line in log.splitlines() if "trioproxy.access" in line]
    assert sum(" 401 " in line for line in statuses) == 3, statuses
    assert sum(" 403 " in line for line in statuses) == 2, statuses


@pytest.mark.parametrize("how", ["sighup", "watch"])
async def test_keys_reload_on_sighup_and_with_watch(
    tmp_path: Path, upstream: str, http_client: httpx.AsyncClient, how: str
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("old-key-1\n")
    config = write_config(tmp_path, ACCESS.format(upstream=upstream, canned=upstream))
    env = {"EDGE_TEST_KEYS": "x"}
    watch = ["--watch"] if how == "watch" else []
    async with run_proxy("--config", config, *watch, env=env) as proxy:

        async def passes(key: str) -> bool:
            # upstream_app answers 404 for /keyed: passing the gate is all that counts.
            response = await http_client.get(
                proxy.url + "/keyed", headers={"authorization": f"Bearer {key}"}
            )
            assert response.status_code in (401, 404), response.text
            return response.status_code == 404

        assert (await passes("old-key-1"), await passes("new-key-2")) == (True, False)
        keys.write_text("new-key-2\n")  # (the config file itself is not touched)
        if how == "sighup":
            proxy.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            await proxy.wait_for_stderr("config reloaded")
        assert (await passes("old-key-1"), await passes("new-key-2")) == (False, True)


async def test_websocket_upgrades_pass_the_same_gate(
    tmp_path: Path, front_end: FrontEnd, upstream: str
) -> None:
    (tmp_path / "keys.txt").write_text("ws-key-123\n")
    config = write_config(
        tmp_path,
        f"""\
        [upstreams.default]
        servers = ["{upstream}"]
        [routes.ws]
        upstream = "default"
        auth = {{ api_keys_file = "keys.txt", header = "x-api-key" }}
        """,
    )
    async with front_end("--config", config) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        with pytest.raises(trio_websocket.HandshakeError) as refused:
            async with trio_websocket.open_websocket_url(url):
                pass
        assert isinstance(refused.value, trio_websocket.ConnectionRejected)
        assert refused.value.status_code == 401
        headers = [("x-api-key", "ws-key-123")]
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message("through")
            assert await ws.get_message() == "through"
        log = await proxy.settled_stderr()
    assert "ws-key-123" not in log
