"""Snapshots: what a reload keeps, what it retires, and when a retired group lets go."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from trioproxy.balance.health_rules import HealthSettings
from trioproxy.balance.target import TargetSpec
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import (
    Config,
    MatchSpec,
    RewriteSpec,
    RouteSettings,
    Timeouts,
    UpstreamGroup,
)
from trioproxy.engine import Engine
from trioproxy.snapshot import build_snapshot
from trioproxy.upstream.origin import UpstreamURL


def group(name: str, *urls: str, **kwargs: object) -> UpstreamGroup:
    return UpstreamGroup(
        name=name,
        servers=tuple(TargetSpec(url=UpstreamURL.parse(url)) for url in urls),
        health=HealthSettings(enabled=False),
        **kwargs,  # type: ignore[arg-type]
    )


def config(*groups: UpstreamGroup, routes: tuple[RouteSettings, ...] = ()) -> Config:
    return Config(
        upstreams={g.name: g for g in groups},
        routes=routes or tuple(RouteSettings(name=g.name, upstream=g.name) for g in groups[:1]),
    )


def test_unchanged_groups_are_carried_over_as_the_same_objects() -> None:
    a, b = group("a", "http://a:1"), group("b", "http://b:1")
    first = build_snapshot(config(a, b))
    first.groups["a"].balancer.targets[0].healthy = False  # state the reload must keep
    changed_b = attrs.evolve(b, timeouts=Timeouts(read=5.0))
    second = build_snapshot(config(a, changed_b), first, generation=2)
    assert second.groups["a"] is first.groups["a"]
    assert second.groups["a"].balancer.targets[0].healthy is False
    assert second.groups["b"] is not first.groups["b"]
    assert second.generation == 2


def test_routes_get_their_group_and_effective_limits() -> None:
    a = group("a", "http://a:1", timeouts=Timeouts(connect=1.0, read=7.0))
    routes = (
        RouteSettings(name="r", upstream="a", match=MatchSpec(path_prefix="/r")),
        RouteSettings(name="other", upstream="a", max_body_size=10),
    )
    snapshot = build_snapshot(config(a, routes=routes))
    r = snapshot.route_for(b"GET", b"/r/1", [(b"host", b"x")])
    assert r is not None and r.name == "r" and r.read_timeout == 7.0
    other = snapshot.route_for(b"GET", b"/x", [])
    assert other is not None and other.max_body_size == 10
    assert not r.has_transforms


def test_every_problem_found_when_made_live_is_reported_at_once() -> None:
    a = group("a", "http://a:1")
    routes = (
        RouteSettings(
            name="one", upstream="a", match=MatchSpec(path_regex="(("), rewrite=RewriteSpec()
        ),
        RouteSettings(name="two", upstream="a", body_transform="no_such_module_here:f"),
    )
    with pytest.raises(ConfigError) as info:
        build_snapshot(config(a, routes=routes))
    lines = str(info.value).splitlines()
    assert any(line.startswith("routes.one.match.path_regex:") for line in lines)
    assert any(line.startswith("routes.two.body_transform:") for line in lines)


async def test_a_retired_group_closes_its_pool_when_its_last_exchange_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = group("a", "http://a:1"), group("b", "http://b:1")
    engine = Engine(use_hub=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        first = build_snapshot(config(a, b))
        await engine.activate(first)
        retiring = first.groups["b"]
        retiring.enter()  # an exchange under way on it
        second = build_snapshot(config(a), first, generation=2)
        await engine.activate(second)
        assert engine.snapshot is second
        assert second.groups["a"] is first.groups["a"]
        assert retiring.retired and not retiring.done.is_set()
        await trio.sleep(60)
        assert not retiring.done.is_set()  # still in use: its pool stays open
        retiring.leave()
        assert retiring.done.is_set()
        await trio.sleep(1)
        assert not first.groups["a"].retired
        nursery.cancel_scope.cancel()
