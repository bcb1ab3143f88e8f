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
from collections.abc import Callable, Mapping
from typing import TypeVar

import attrs

from trioproxy.balance.group import LiveGroup
from trioproxy.config.errors import ConfigError
from trioproxy.config.model import Config, RouteSettings
from trioproxy.edge.access import AccessPolicy, KeyCheck
from trioproxy.edge.identity import IdentityPolicy
from trioproxy.edge.limits import EdgeState, RouteLimits
from trioproxy.http.cors import CorsPolicy, compile_cors
from trioproxy.http.headers import get_first
from trioproxy.http.protocol import Headers, RequestHead
from trioproxy.http.transforms import (
    BodyTransform,
    FieldEditor,
    HeaderRuleSet,
    HeaderTransform,
    PathRewrite,
    TemplateValues,
    compile_header_rules,
    compile_rewrite,
    load_body_transform,
)
from trioproxy.routing import Router, route_key_path

_S = TypeVar("_S")
_T = TypeVar("_T")


# The placeholders the engine has values for where it applies each direction's
# rules (``Engine._request_edit``, ``Engine._response_edit``); ``{route}`` and
# ``{upstream}`` are written in when the route is made.
_ENGINE_REQUEST = frozenset({"request_id", "client_ip"})
_ENGINE_RESPONSE = frozenset({"request_id", "server", "process_time"})

_NO_HEADER_RULES = HeaderRuleSet(HeaderTransform(), HeaderTransform())


@attrs.define(eq=False)
class Route:
    """A ``[routes.NAME]`` table made live: its settings, the group it sends to, and
    its transforms compiled."""

    settings: RouteSettings
    #: None for a ``respond`` route (answered by the proxy itself).
    group: LiveGroup | None
    read_timeout: float
    connect_timeout: float | None
    #: The request body limit on this route (the server's unless the route sets one).
    max_body_size: int | None
    rewrite: PathRewrite | None = None
    #: The server's header rules, then the route's (``{route}`` and ``{upstream}``
    #: written in when the route is made: they are the same on every exchange).
    headers: HeaderRuleSet = _NO_HEADER_RULES
    cors: CorsPolicy | None = None
    body_transform: BodyTransform | None = None
    #: Rate limits and ``max_inflight``; None when the route has neither.
    limits: RouteLimits | None = None
    #: Whether ``X-Forwarded-*`` go upstream (``[server] forwarded``).
    x_forwarded: bool = True
    #: ``allow``, ``deny`` and ``auth`` (``trioproxy.edge.access``); None: no rule.
    access: AccessPolicy | None = None
    #: Whether any of the above changes requests or responses (the hot path
    #: asks once).
    has_transforms: bool = attrs.field(init=False)
    #: The template placeholders its header rules use, both directions.
    placeholders: frozenset[str] = attrs.field(init=False)
    #: Whether its rules use a value taken from the client's request (``{host}``,
    #: ``{method}``, ``{path}``): then ``template_values`` is made for each
    #: exchange; else the engine passes the values it has
    #: (``FieldEditor.edit_known``).
    values_from_request: bool = attrs.field(init=False)
    #: ``{route}`` and ``{upstream}`` as the bytes to write, encoded once.
    name_bytes: bytes = attrs.field(init=False)
    upstream_bytes: bytes = attrs.field(init=False)
    #: The header rules as each message's edit, per direction (None: no rules),
    #: for the passes that build the upstream request's and the client
    #: response's fields.
    request_editor: FieldEditor | None = attrs.field(init=False)
    response_editor: FieldEditor | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.name_bytes = self.settings.name.encode()
        self.upstream_bytes = self.group.name.encode() if self.group is not None else b""
        constants = {"route": self.name_bytes, "upstream": self.upstream_bytes}
        self.headers = self.headers.bind(constants)
        self.request_editor = FieldEditor.of(self.headers.request, request=True)
        self.response_editor = FieldEditor.of(self.headers.response, request=False)
        self.has_transforms = bool(
            self.rewrite is not None
            or self.headers.request
            or self.headers.response
            or self.cors is not None
            or self.body_transform is not None
        )
        self.placeholders = self.headers.request.placeholders | self.headers.response.placeholders
        self.values_from_request = not (
            self.headers.request.placeholders <= _ENGINE_REQUEST
            and self.headers.response.placeholders <= _ENGINE_RESPONSE
        )

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def upstream_name(self) -> str:
        """Its upstream group's name ("" when the proxy answers itself)."""
        return self.group.name if self.group is not None else ""

    def template_values(
        self, request: RequestHead, client_addr: str, request_id: bytes
    ) -> TemplateValues | None:
        """The header templates' values taken from the client's request, only those
        the rules use (each costs a call, on every request of the route); None when
        they use none."""
        needed = self.placeholders
        if not needed:
            return None
        # Positional: the keyword form costs twice as much, on every request.
        return TemplateValues(
            request_id,  # request_id
            client_addr.encode("latin-1") if "client_ip" in needed else b"",  # client_ip
            (get_first(request.headers, b"host") or b"") if "host" in needed else b"",  # host
            request.method,  # method
            request.target.partition(b"?")[0] if "path" in needed else b"",  # path
            self.name_bytes,  # route
            self.upstream_bytes,  # upstream
        )

    def response_headers(
        self, headers: Headers, values: TemplateValues | None, origin: bytes | None
    ) -> Headers:
        """``headers`` with the response header rules applied, then the CORS fields
        for ``origin`` (an upstream's response and a ``respond`` answer alike)."""
        if self.headers.response:
            headers = self.headers.response.apply(headers, values)
        if self.cors is not None:
            headers = self.cors.response_headers(origin, headers)
        return headers

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
    #: Rate limit stores and route counters, carried from snapshot to snapshot.
    edge: EdgeState = attrs.field(factory=EdgeState)
    router: Router[Route] = attrs.field(init=False)
    #: ``route_for(method, target, headers)``: the route a request takes, or None
    #: (the client gets 404).
    route_for: Callable[[bytes, bytes, Headers], Route | None] = attrs.field(init=False)
    #: ``[server] trusted_proxies`` and ``forwarded`` (``trioproxy.edge.identity``).
    identity: IdentityPolicy = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.router = Router([(route.settings, route) for route in self.routes])
        self.route_for = self.router.match
        server = self.config.server
        self.identity = IdentityPolicy(server.trusted_proxies, server.forwarded)

    @classmethod
    def of_routes(cls, routes: list[Route]) -> Snapshot:
        """A snapshot of routes built by hand (no config file behind them)."""
        groups = {r.group.name: r.group for r in routes if r.group is not None}
        return cls(config=Config(), routes=routes, groups=groups)


def build_snapshot(
    config: Config, previous: Snapshot | None = None, *, generation: int = 1
) -> Snapshot:
    """Make ``config`` live, carrying over the unchanged groups of ``previous``.

    Raises:
        ConfigError: a value only found wrong when made live (a regex, a module).
    """
    server = config.server
    problems: list[str] = []
    server_headers = (
        _collect(problems, compile_header_rules, server.headers, "server.headers")
        or _NO_HEADER_RULES
    )
    kept = previous.groups if previous is not None else {}
    edge = EdgeState.carry(server, previous.edge if previous is not None else None)
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
        where = route_key_path(settings.name)
        headers = _collect(problems, compile_header_rules, settings.headers, f"{where}.headers")
        rewrite = cors = transform = None
        if settings.rewrite is not None:
            rewrite = _collect(problems, compile_rewrite, settings.rewrite, f"{where}.rewrite")
        if settings.cors is not None:
            cors = _collect(problems, compile_cors, settings.cors, f"{where}.cors")
        if settings.body_transform is not None:
            transform = _collect(
                problems, load_body_transform, settings.body_transform, f"{where}.body_transform"
            )
        routes.append(
            Route(
                settings=settings,
                group=group,
                read_timeout=read_timeout,
                connect_timeout=settings.timeouts.connect,
                max_body_size=settings.max_body_size
                if settings.max_body_size is not None
                else server.max_body_size,
                rewrite=rewrite,
                headers=server_headers.then(headers) if headers is not None else server_headers,
                cors=cors,
                body_transform=transform,
                limits=edge.route_limits(settings),
                x_forwarded=server.forwarded != "rfc7239",
                access=_access_policy(settings),
            )
        )
    snapshot = None
    try:
        snapshot = Snapshot(
            config=config, routes=routes, groups=groups, generation=generation, edge=edge
        )
    except ConfigError as exc:  # from the router: duplicates, bad hosts, paths, regexes
        problems.extend(str(exc).splitlines())
    if problems:
        raise ConfigError("\n".join(problems))
    assert snapshot is not None
    return snapshot


def _access_policy(settings: RouteSettings) -> AccessPolicy | None:
    auth = settings.auth
    if not (settings.allow or settings.deny or auth is not None):
        return None
    return AccessPolicy(
        allow=settings.allow,
        deny=settings.deny,
        auth=None
        if auth is None
        else KeyCheck.of(auth.keys, header=auth.header, forward_key=auth.forward_key),
    )


def _collect(
    problems: list[str], compile: Callable[[_S, str], _T], spec: _S, key_path: str
) -> _T | None:
    """``compile(spec, key_path)``, its ConfigError's lines added to ``problems``."""
    try:
        return compile(spec, key_path)
    except ConfigError as exc:
        problems.extend(str(exc).splitlines())
        return None
