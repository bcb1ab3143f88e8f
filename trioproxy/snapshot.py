"""Config snapshots: what one request is routed and served on.

A :class:`Snapshot` is a validated config made live: its routes, each bound to
a :class:`~trioproxy.balance.group.LiveGroup`, and the router that picks one.
The server holds one current snapshot; an exchange takes it when its request
head arrives and keeps it to its end, streams and tunnels included. A reload
builds a new snapshot and swaps one reference (``Engine.activate``).

Groups are carried over: when the new config has a group of the same name
whose settings are equal, the new snapshot gets the very same ``LiveGroup``
(pool, health, breakers, latency), so a reload is no cold start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import attrs

from trioproxy.balance.group import LiveGroup
from trioproxy.config.model import Config, RouteSettings
from trioproxy.http.protocol import Headers


@attrs.define(eq=False)
class Route:
    """A ``[routes.NAME]`` table made live: its settings and the group it sends to."""

    settings: RouteSettings
    #: None for a ``respond`` route (answered by the proxy itself).
    group: LiveGroup | None
    read_timeout: float
    connect_timeout: float | None
    #: The request body limit on this route (the server's unless the route sets one).
    max_body_size: int | None

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    def to_group(
        cls, group: LiveGroup, *, name: str = "default", max_body_size: int | None = None
    ) -> Route:
        """A catch-all route to ``group`` with its timeouts (for code that builds a
        group itself: the library helpers, tests)."""
        return cls(
            settings=RouteSettings(name=name, upstream=group.name),
            group=group,
            read_timeout=group.read_timeout,
            connect_timeout=None,
            max_body_size=max_body_size,
        )


@attrs.define(eq=False)
class Snapshot:
    config: Config
    routes: list[Route]
    groups: Mapping[str, LiveGroup]
    generation: int = 1
    #: Wall-clock time it was made (for ``/status``).
    loaded_at: float = attrs.field(factory=time.time)

    @classmethod
    def of_routes(cls, routes: list[Route]) -> Snapshot:
        """A snapshot of routes built by hand (no config file behind them)."""
        groups = {r.group.name: r.group for r in routes if r.group is not None}
        return cls(config=Config(), routes=routes, groups=groups)

    def route_for(self, method: bytes, target: bytes, headers: Headers) -> Route | None:
        """The route a request takes, or None (the client gets 404)."""
        # Until routes match on anything, the only route is the catch-all one.
        return self.routes[0] if self.routes else None


def build_snapshot(
    config: Config, previous: Snapshot | None = None, *, generation: int = 1
) -> Snapshot:
    """Make ``config`` live, carrying over the unchanged groups of ``previous``.

    Raises:
        ConfigError: a value only found wrong when made live (a regex, a module).
    """
    server = config.server
    kept = previous.groups if previous is not None else {}
    groups: dict[str, LiveGroup] = {}
    for name, group_settings in config.upstreams.items():
        old = kept.get(name)
        if old is not None and old.settings == group_settings:
            groups[name] = old
        else:
            groups[name] = LiveGroup.build(
                group_settings, http=server.http, max_head_size=server.max_header_size
            )
    routes = []
    for settings in config.routes:
        group = groups[settings.upstream] if settings.upstream is not None else None
        read_timeout = settings.timeouts.read
        if read_timeout is None:
            read_timeout = group.settings.timeouts.read if group is not None else 0.0
        routes.append(
            Route(
                settings=settings,
                group=group,
                read_timeout=read_timeout,
                connect_timeout=settings.timeouts.connect,
                max_body_size=settings.max_body_size
                if settings.max_body_size is not None
                else server.max_body_size,
            )
        )
    return Snapshot(config=config, routes=routes, groups=groups, generation=generation)
