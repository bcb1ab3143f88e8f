"""The admin listener: ``AdminApp.respond`` directly, then ``/status`` over a real socket
from the real ``python -m trioproxy --admin-port 0``."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio
from fixtures import raw_request, run_proxy, serve_tcp_handler

from trioproxy.admin import AdminApp
from trioproxy.balance.balancer import Balancer
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.config.model import Config, PassiveSettings, RouteSettings, UpstreamGroup
from trioproxy.engine import Engine
from trioproxy.snapshot import build_snapshot
from trioproxy.upstream.origin import UpstreamURL

pytestmark = pytest.mark.timeout(20)

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


def make_app(*names: str, eject_after: int = 3) -> tuple[AdminApp, list[Target]]:
    group = UpstreamGroup(
        name="default",
        servers=tuple(TargetSpec(url=UpstreamURL.parse(f"http://{n}:8000")) for n in names),
        passive=PassiveSettings(eject_after=eject_after),
    )
    config = Config(
        upstreams={"default": group}, routes=(RouteSettings(name="default", upstream="default"),)
    )
    engine = Engine()
    engine.snapshot = build_snapshot(config)
    return AdminApp(engine), engine.snapshot.groups["default"].balancer.targets


def balancer(app: AdminApp) -> Balancer:
    assert app.engine.snapshot is not None
    return app.engine.snapshot.groups["default"].balancer


def get(app: AdminApp, target: bytes, method: bytes = b"GET") -> tuple[int, bytes, Any]:
    status, content_type, body = app.respond(method, target)
    return status, content_type, json.loads(body) if content_type == JSON else body


# --- AdminApp.respond ------------------------------------------------------------------


async def test_ping() -> None:
    app, _ = make_app("a")
    assert app.respond(b"GET", b"/ping") == (200, TEXT, b"pong\n")
    assert app.respond(b"GET", b"/ping?from=lb") == (200, TEXT, b"pong\n")
    assert app.respond(b"HEAD", b"/ping")[0] == 200


async def test_health_is_200_while_one_target_is_healthy() -> None:
    app, (a, _b) = make_app("a", "b")
    assert get(app, b"/health") == (200, JSON, {"status": "ok", "healthy": 2, "total": 2})
    a.healthy = False
    assert get(app, b"/health") == (200, JSON, {"status": "ok", "healthy": 1, "total": 2})


async def test_health_is_503_when_no_target_is_healthy() -> None:
    app, (a, b) = make_app("a", "b")
    a.healthy = False
    b.ejected_until = trio.current_time() + 10
    assert get(app, b"/health") == (503, JSON, {"status": "unavailable", "healthy": 0, "total": 2})


async def test_health_is_503_when_every_breaker_is_open() -> None:
    app, (a,) = make_app("a", eject_after=0)
    now = trio.current_time()
    for _ in range(5):
        balancer(app).on_failure(a, now)
    status, _, body = get(app, b"/health")
    assert status == 503 and body["status"] == "unavailable"


async def test_health_recovers_when_an_open_breaker_may_take_trials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, (a,) = make_app("a", eject_after=0)
    now = trio.current_time()
    for _ in range(5):
        balancer(app).on_failure(a, now)
    await trio.sleep(30.0)  # the default open_for: pick() would admit a trial now
    assert balancer(app).has_candidate(trio.current_time())
    # A load balancer in front that trusts /health sends nothing while it says 503,
    # and without a request the breaker never leaves OPEN.
    assert get(app, b"/health")[0] == 200


async def test_status_lists_every_target() -> None:
    app, (a, b) = make_app("a", "b")
    balancer(app).on_success(a, trio.current_time(), latency=0.005)
    b.healthy = False
    status, content_type, body = get(app, b"/status")
    assert (status, content_type) == (200, JSON)
    first, second = body["targets"]
    assert first["url"] == "http://a:8000"
    assert second["url"] == "http://b:8000"
    for entry in (first, second):
        assert {
            "url",
            "weight",
            "healthy",
            "ejected",
            "inflight",
            "tunnels",
            "latency_ms",
            "last_latency_ms",
            "requests",
            "failures",
            "breaker",
        } <= entry.keys()
        assert entry["breaker"]["state"] == "closed"
    assert first["healthy"] is True and second["healthy"] is False
    assert first["latency_ms"] == 5.0 and first["last_latency_ms"] == 5.0
    assert first["requests"] == 1 and second["requests"] == 0


async def test_unknown_path_is_404() -> None:
    app, _ = make_app("a")
    assert app.respond(b"GET", b"/nope") == (404, TEXT, b"not found\n")
    assert app.respond(b"GET", b"/status/extra")[0] == 404


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"get"])
async def test_other_methods_are_405(method: bytes) -> None:
    app, _ = make_app("a")
    assert app.respond(method, b"/status") == (405, TEXT, b"method not allowed\n")


# --- over a real socket ----------------------------------------------------------------


async def _answer_ok(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        if b"\r\n\r\n" in data:
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            return


_ADMIN = re.compile(r"admin listening on http://([\d.]+):(\d+)")


async def test_status_over_a_real_socket_lists_every_target(nursery: trio.Nursery) -> None:
    up_a = await serve_tcp_handler(_answer_ok, nursery)
    up_b = await serve_tcp_handler(_answer_ok, nursery)
    # A port nothing listens on: the health check marks it down before the start.
    async with trio.open_nursery() as closing:
        host, dead_port = await serve_tcp_handler(_answer_ok, closing)
        closing.cancel_scope.cancel()
    urls = [
        f"http://{up_a[0]}:{up_a[1]}",
        f"http://{up_b[0]}:{up_b[1]}",
        f"http://{host}:{dead_port}",
    ]
    async with run_proxy(
        "--upstream",
        urls[0] + ",weight=3",
        "--upstream",
        urls[1] + ",max_inflight=7",
        "--upstream",
        urls[2],
        "--admin-port",
        "0",
        "--health-interval",
        "30",
        health_check=True,
    ) as proxy:
        with trio.fail_after(5):
            log = await proxy.wait_for_stderr("admin listening on")
        match = _ADMIN.search(log)
        assert match, log
        admin_host, admin_port = match.group(1), int(match.group(2))
        assert admin_host == "127.0.0.1"  # never all interfaces unless told
        assert admin_port != proxy.port

        raw = await raw_request(admin_host, admin_port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw
        assert b"content-type: application/json" in head.lower()
        targets = json.loads(body)["targets"]
        assert [t["url"] for t in targets] == urls
        assert [t["healthy"] for t in targets] == [True, True, False]
        assert [t["weight"] for t in targets] == [3, 1, 1]
        assert [t["max_inflight"] for t in targets] == [None, 7, None]
        # The first probe round measured the live ones.
        assert all(t["last_latency_ms"] is not None for t in targets[:2])
        assert all(t["breaker"]["state"] == "closed" for t in targets)

        raw = await raw_request(admin_host, admin_port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200"), raw
        assert json.loads(raw.partition(b"\r\n\r\n")[2]) == {
            "status": "ok",
            "healthy": 2,
            "total": 3,
        }
        raw = await raw_request(admin_host, admin_port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"\r\n\r\npong\n"), raw
