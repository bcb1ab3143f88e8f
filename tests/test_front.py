"""The steps both front ends take around the engine (trioproxy.front), without sockets:
a snapshot made live from a TOML file, an engine that is never run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest

from trioproxy.config.load import ConfigSources, load_config
from trioproxy.edge.access import KeyMissing
from trioproxy.engine import Engine
from trioproxy.errors import BodyTooLarge, NoRoute, RateLimited, RouteBusy
from trioproxy.front import FrontExchange
from trioproxy.http.protocol import RequestHead
from trioproxy.observe.observer import Observer
from trioproxy.snapshot import build_snapshot

CONFIG = """\
[server]
trusted_proxies = ["127.0.0.1/32"]
[upstreams.app]
servers = ["http://127.0.0.1:9"]
health = false
[routes.ping]
handler = "ping"
match = { path = "/ping" }
[routes.pong]
respond = { status = 200, body = "pong" }
match = { path = "/pong" }
[routes.keyed]
upstream = "app"
match = { path_prefix = "/keyed" }
auth = { api_keys_env = "FRONT_TEST_KEYS", header = "x-api-key" }
rate_limit = [{ average = 1, period = "1m", burst = 1, key = "api_key" }]
[routes.by_ip]
upstream = "app"
match = { path_prefix = "/ip" }
rate_limit = [{ average = 1, period = "1m", burst = 1, key = "ip" }]
[routes.capped]
upstream = "app"
match = { path_prefix = "/capped" }
max_inflight = 1
max_body_size = 10
"""


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    path = tmp_path / "trioproxy.toml"
    path.write_text(textwrap.dedent(CONFIG))
    config = load_config(
        ConfigSources(
            config_file=str(path),
            environ={"FRONT_TEST_KEYS": "key-a,key-b"},
            cwd=str(tmp_path),
        )
    )
    engine = Engine(use_hub=False)
    engine.snapshot = build_snapshot(config)
    engine.observer = Observer(config.server)
    return engine


def head(target: bytes, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> RequestHead:
    return RequestHead(method, target, [(b"host", b"h"), *headers])


def exchange(engine: Engine, request: RequestHead, peer: str = "127.0.0.1") -> FrontExchange:
    return FrontExchange(engine, request, peer=peer, scheme="http")


def test_metrics_path_comes_before_every_route(engine: Engine) -> None:
    # /pong would match the respond route: metrics_path is the proxy's own.
    answer = exchange(engine, head(b"/pong?x=1")).admit(metrics_path=b"/pong")
    assert answer is not None and answer.status == 200
    assert answer.body.startswith(b"# HELP")
    engine.observer = None
    off = exchange(engine, head(b"/pong")).admit(metrics_path=b"/pong")
    assert off is not None and off.status == 404


def test_no_route_is_404_and_the_record_names_none(engine: Engine) -> None:
    assert engine.snapshot is not None
    config = engine.snapshot.config
    routes = tuple(route for route in config.routes if route.name == "ping")
    engine.snapshot = build_snapshot(attrs.evolve(config, routes=routes))
    front = exchange(engine, head(b"/elsewhere"))
    with pytest.raises(NoRoute):
        front.admit()
    assert front.record.route == "-"


def test_handler_and_respond_routes_are_answered_by_the_proxy(engine: Engine) -> None:
    ping = exchange(engine, head(b"/ping", (b"x-request-id", b"r-1")))
    assert ping.admit() is None
    answer = ping.own_answer(now=0.0)
    assert answer is not None and (answer.status, answer.body) == (200, b"pong\n")
    assert ping.record.request_id == b"r-1"
    assert ping.record.group == ""  # a handler route has no upstream group
    pong = exchange(engine, head(b"/pong"))
    assert pong.admit() is None
    answer = pong.own_answer(now=0.0)
    assert answer is not None and answer.body == b"pong"


def test_the_gate_takes_the_real_client_and_strips_the_key(engine: Engine) -> None:
    front = exchange(
        engine, head(b"/keyed", (b"x-api-key", b"key-a"), (b"x-forwarded-for", b"198.51.100.7"))
    )
    assert front.admit() is None
    assert front.client_ip == "198.51.100.7"
    assert all(name != b"x-api-key" for name, _ in front.request.headers)
    assert front.own_answer(now=0.0) is None  # it goes upstream
    missing = exchange(engine, head(b"/keyed"))
    with pytest.raises(KeyMissing):
        missing.admit()


async def test_rate_limits_count_the_presented_key_under_the_real_ip(engine: Engine) -> None:
    """The gate strips the key before the head goes on; the limits still count by it."""
    for key in (b"key-a", b"key-b"):
        front = exchange(engine, head(b"/keyed", (b"x-api-key", key)))
        assert front.admit() is None
        await front.admit_limits(now=0.0)  # each key its own bucket
        front.release()
    again = exchange(engine, head(b"/keyed", (b"x-api-key", b"key-a")))
    again.admit()
    with pytest.raises(RateLimited):
        await again.admit_limits(now=0.0)

    # By IP: the address X-Forwarded-For names from a trusted peer, not the peer.
    for client in (b"198.51.100.1", b"198.51.100.2"):
        front = exchange(engine, head(b"/ip", (b"x-forwarded-for", client)))
        front.admit()
        await front.admit_limits(now=0.0)
        front.release()
    same = exchange(engine, head(b"/ip", (b"x-forwarded-for", b"198.51.100.1")))
    same.admit()
    with pytest.raises(RateLimited):
        await same.admit_limits(now=0.0)


async def test_a_declared_length_over_the_limit_is_refused_before_the_limits(
    engine: Engine,
) -> None:
    big = exchange(engine, head(b"/capped", (b"content-length", b"11"), method=b"POST"))
    with pytest.raises(BodyTooLarge):
        big.admit()
    assert big.body_limit == 10
    # No in-flight place was taken: one request still gets in.
    first = exchange(engine, head(b"/capped"))
    first.admit()
    await first.admit_limits(now=0.0)
    second = exchange(engine, head(b"/capped"))
    second.admit()
    with pytest.raises(RouteBusy):
        await second.admit_limits(now=0.0)
    first.release()
    first.release()  # idempotent: the place is given back once
    await second.admit_limits(now=0.0)
    third = exchange(engine, head(b"/capped"))
    third.admit()
    with pytest.raises(RouteBusy):
        await third.admit_limits(now=0.0)


def test_upstream_counts_the_group_and_a_tunnel_open(engine: Engine) -> None:
    front = exchange(engine, head(b"/ip"))
    front.admit()
    assert front.own_answer(now=0.0) is None
    observer = engine.observer
    assert observer is not None
    with front.upstream(tunnel=True) as route:
        assert route.group is not None and route.group.exchanges == 1
        assert observer.tunnels == {"by_ip": 1}
    assert route.group.exchanges == 0
    assert observer.tunnels == {"by_ip": 0}
    with front.upstream():
        assert observer.tunnels == {"by_ip": 0}


def test_end_counts_the_exchange_in_the_metrics(engine: Engine) -> None:
    front = exchange(engine, head(b"/pong"))
    front.admit()
    answer = front.own_answer(now=0.0)
    assert answer is not None
    front.record.status = answer.status
    front.end(bytes_in=0)
    observer = engine.observer
    assert observer is not None
    text = observer.metrics.exposition().decode()
    assert 'trioproxy_requests_total{code="200",method="GET",route="pong",upstream=""} 1.0' in text
