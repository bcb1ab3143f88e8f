"""The configuration model: nested frozen attrs classes, one per TOML table.

Every field is named as its TOML key (``[upstreams.NAME] retry.attempts`` is
``UpstreamGroup.retry.attempts``) and every default lives here, once: the
command line, the environment and the file only override. Durations are
seconds (floats), sizes bytes (ints).

The shape::

    Config
    ├─ server: ServerSettings        [server]
    │    ├─ admin: AdminSettings | None
    │    ├─ headers: HeaderRules     applied on every route
    │    └─ redis: RedisSettings | None   the shared store of rate limits
    ├─ upstreams: {name: UpstreamGroup}   [upstreams.NAME]
    │    servers (TargetSpec), strategy, health, passive, breaker, retry,
    │    pool, timeouts, tls, preserve_host
    └─ routes: (RouteSettings, ...)  [routes.NAME], in file order
         match, rewrite, headers, cors, respond, timeouts, max_body_size,
         body_transform, rate_limit (RateLimitSpec), max_inflight

Values are checked where they are loaded (``trioproxy.config.load``, with the
checks of ``trioproxy.config.values``), so that an error can name its source
and key path; the classes here hold what passed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import attrs

from trioproxy.balance.balancer import BreakerSettings
from trioproxy.balance.health_rules import HealthSettings
from trioproxy.balance.target import TargetSpec

#: (name, value) pairs, in file order; names lower-case.
HeaderPairs = tuple[tuple[str, str], ...]

#: The duration histograms' default buckets (seconds): 1 ms to 5 min.
DEFAULT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


@attrs.frozen(kw_only=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9901


@attrs.frozen(kw_only=True)
class HeaderRules:
    """``headers = { request_set = {...}, request_remove = [...], ... }``.

    ``*_set`` replaces every line of that name with one; ``*_add`` appends a
    line and keeps the others; ``*_remove`` drops every line of that name.
    Values are templates (``{request_id}``, ``{client_ip}``... see
    ``trioproxy.http.transforms``).
    """

    request_set: HeaderPairs = ()
    request_add: HeaderPairs = ()
    request_remove: tuple[str, ...] = ()
    response_set: HeaderPairs = ()
    response_add: HeaderPairs = ()
    response_remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(attrs.astuple(self, recurse=False))


@attrs.frozen(kw_only=True)
class RedisSettings:
    """``[server] redis``: the shared store of rate limits."""

    url: str = "redis://127.0.0.1:6379/0"
    #: Longer than this and the store counts as failed for that request.
    timeout: float = 0.05
    #: ``"allow"`` or ``"deny"`` (503) a request whose limit the store could not check.
    on_store_error: str = "allow"


@attrs.frozen(kw_only=True)
class RateLimitSpec:
    """One entry of a route's ``rate_limit``: ``average`` requests per ``period`` per
    key, up to ``burst`` at once (default: ``average``)."""

    average: int
    period: float = 1.0
    #: None: ``average`` (a whole period's quota may come at once).
    burst: int | None = None
    #: ``ip``, ``route``, ``api_key`` or ``header:NAME`` (name lower-case).
    key: str = "ip"
    #: ``memory`` (this process) or ``redis`` (shared by every instance).
    store: str = "memory"


@attrs.frozen(kw_only=True)
class SniCertificate:
    """``[[server.tls.sni]]``: a certificate for the names a client may ask for."""

    #: Exact names or ``*.`` wildcards, lower-case.
    hosts: tuple[str, ...]
    cert: str
    key: str


@attrs.frozen(kw_only=True)
class RedirectHTTP:
    """``tls.redirect_http``: where the plain listener that answers 308 listens."""

    #: None: the server's own ``host``.
    host: str | None = None
    port: int = 80


@attrs.frozen(kw_only=True)
class ServerTLS:
    """``[server] tls``: TLS termination (see ``trioproxy.edge.tls``). Paths resolved."""

    cert: str
    key: str
    sni: tuple[SniCertificate, ...] = ()
    redirect_http: RedirectHTTP | None = None


@attrs.frozen(kw_only=True)
class ServerSettings:
    """``[server]``: the listener and what applies to every route."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Parser behind the seam: auto (httptools if importable), h11 or httptools.
    http: str = "auto"
    log_level: str = "info"
    grace: float = 10.0
    #: Worker processes (``--workers``; see ``trioproxy.server.supervisor``); 1 = this
    #: process serves, with no supervisor.
    workers: int = 1
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_header_size: int = 65536
    #: None = unlimited.
    max_body_size: int | None = None
    ws_max_message_size: int = 16 << 20
    #: 0 = no idle timeout.
    ws_idle_timeout: float = 0.0
    admin: AdminSettings | None = None
    headers: HeaderRules = HeaderRules()
    #: Start the two built-in demo upstreams (command line only).
    demo: bool = False
    #: ``redis = { url, timeout, on_store_error }``: the store of ``store = "redis"``
    #: rate limits; None: no route may use one.
    redis: RedisSettings | None = None
    #: Most keys the memory store of rate limits holds (least recently used go first).
    rate_limit_max_keys: int = 100_000
    #: Peers whose X-Forwarded-For is believed (see ``trioproxy.edge.identity``).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: ``x-forwarded``, ``rfc7239`` or ``both``: which forwarding fields go upstream.
    forwarded: str = "x-forwarded"
    #: TLS termination; None: plain HTTP.
    tls: ServerTLS | None = None
    #: Prometheus metrics and the LLM stream meter (``false``: neither is kept).
    metrics: bool = True
    #: Serve ``/metrics`` at this path on the proxy's own listener too (None: not).
    metrics_path: str | None = None
    #: Upper bounds (seconds) of the duration histograms' buckets.
    metrics_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    #: The access log's lines: ``text`` or ``json`` (one object per line).
    log_format: str = "text"
    #: Write the access log to this file instead of stderr (None: stderr).
    access_log: str | None = None


@attrs.frozen(kw_only=True)
class PassiveSettings:
    """Live traffic's verdict: ``eject_after`` failures in a row eject for ``eject_for``."""

    eject_after: int = 3
    eject_for: float = 10.0


@attrs.frozen(kw_only=True)
class RetrySettings:
    #: Retries after the first try (``--retries``): 2 means up to 3 tries in all.
    attempts: int = 2
    #: Retries are at most this share of recent requests.
    budget: float = 0.2
    #: Largest request body kept to be sent again.
    replay_limit: int = 1 << 20


@attrs.frozen(kw_only=True)
class PoolSettings:
    max_connections: int = 256
    idle_timeout: float = 60.0
    #: How long a request waits for a connection under the cap, else 503.
    timeout: float = 30.0


@attrs.frozen(kw_only=True)
class Timeouts:
    connect: float = 5.0
    read: float = 300.0


@attrs.frozen(kw_only=True)
class RouteTimeouts:
    """A route's overrides of its group's timeouts; None keeps the group's."""

    connect: float | None = None
    read: float | None = None


@attrs.frozen(kw_only=True)
class UpstreamTLS:
    verify: bool = True
    #: CA bundle (PEM) to verify with instead of the system's.
    ca: str | None = None
    #: A client certificate chain and key (PEM) for upstreams that ask for one (mTLS).
    cert: str | None = None
    key: str | None = None


@attrs.frozen(kw_only=True)
class UpstreamGroup:
    """``[upstreams.NAME]``: servers and how to balance and protect them."""

    name: str
    servers: tuple[TargetSpec, ...]
    strategy: str = "round_robin"
    health: HealthSettings = attrs.field(factory=HealthSettings)
    passive: PassiveSettings = PassiveSettings()
    breaker: BreakerSettings = attrs.field(factory=BreakerSettings)
    retry: RetrySettings = RetrySettings()
    pool: PoolSettings = PoolSettings()
    timeouts: Timeouts = Timeouts()
    tls: UpstreamTLS = UpstreamTLS()
    preserve_host: bool = False


@attrs.frozen(kw_only=True)
class MatchSpec:
    """``match = {...}``: every condition given must hold; none given matches all."""

    #: Exact names or ``*.`` wildcards, lower-case; any one may match.
    host: tuple[str, ...] = ()
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    #: Upper-case; any one may match.
    methods: tuple[str, ...] = ()
    #: (lower-case name, exact value) pairs; all must match.
    headers: HeaderPairs = ()


@attrs.frozen(kw_only=True)
class RewriteSpec:
    """``rewrite = {...}``: how the path sent upstream is made from the client's."""

    strip_prefix: str | None = None
    add_prefix: str | None = None
    regex: str | None = None
    replacement: str | None = None
    #: Exact path mappings (client path → upstream path).
    paths: HeaderPairs = ()


@attrs.frozen(kw_only=True)
class CorsSpec:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: int | None = None


@attrs.frozen(kw_only=True)
class RespondSpec:
    """``respond = {...}``: answered by the proxy itself, no upstream."""

    status: int = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


@attrs.frozen(kw_only=True)
class AuthSpec:
    """``auth = {...}``: API keys a route requires (see ``trioproxy.edge.access``)."""

    #: Where the keys came from: a file (one key per line) or an environment
    #: variable (keys separated by commas); the loader reads them into ``keys``.
    #: Resolved against the config file's directory.
    api_keys_file: str | None = None
    api_keys_env: str | None = None
    #: The request field that carries the key (lower-case); None: Authorization: Bearer.
    header: str | None = None
    forward_key: bool = False
    #: The keys themselves, as read when the config was loaded (never shown).
    keys: tuple[str, ...] = attrs.field(default=(), repr=False)


@attrs.frozen(kw_only=True)
class LlmSpec:
    """``llm = {...}``: the route carries an LLM API, metered (``trioproxy.observe.llm``)."""

    api: str = "openai"
    #: The model label's values; others count as ``other`` (empty: the first 32 seen).
    models: tuple[str, ...] = ()
    #: ``pass`` or ``inject`` (ask streamed requests for a usage chunk, hide it).
    include_usage: str = "pass"


@attrs.frozen(kw_only=True)
class RouteSettings:
    """``[routes.NAME]``: exactly one of ``upstream`` and ``respond``."""

    name: str
    upstream: str | None = None
    respond: RespondSpec | None = None
    #: Higher is tried first.
    priority: int = 0
    match: MatchSpec = MatchSpec()
    rewrite: RewriteSpec | None = None
    headers: HeaderRules = HeaderRules()
    cors: CorsSpec | None = None
    timeouts: RouteTimeouts = RouteTimeouts()
    #: Replaces the server's limit for this route (None keeps it).
    max_body_size: int | None = None
    #: ``"package.module:function"``; see ``trioproxy.http.transforms``.
    body_transform: str | None = None
    body_transform_limit: int = 1 << 20
    #: ``rate_limit = [{ average, period, burst, key, store }, ...]``: every one must
    #: admit a request (see ``trioproxy.edge.ratelimit``).
    rate_limit: tuple[RateLimitSpec, ...] = ()
    #: Most requests (and WebSocket tunnels) open at once on this route; None: no cap.
    max_inflight: int | None = None
    #: Client networks allowed (empty: all) and denied (``trioproxy.edge.access``).
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    auth: AuthSpec | None = None
    #: Answered by the proxy: ``metrics``, ``health`` (of its upstream) or ``ping``.
    handler: str | None = None
    llm: LlmSpec | None = None


@attrs.frozen(kw_only=True)
class Config:
    server: ServerSettings = ServerSettings()
    upstreams: Mapping[str, UpstreamGroup] = attrs.field(factory=dict)
    routes: tuple[RouteSettings, ...] = ()
    #: The file it was read from, if any (for reload and for messages).
    source: str | None = None
    #: ``--watch``: reload when the file changes.
    watch: bool = False

    def servers(self) -> int:
        return sum(len(group.servers) for group in self.upstreams.values())

    def files_read(self) -> tuple[str, ...]:
        """The files besides its own that a reload reads again: the TLS certificates
        and keys (``[server.tls]``, its ``sni`` entries) and the routes' API key
        files. ``--watch`` polls them too."""
        paths: list[str] = []
        tls = self.server.tls
        if tls is not None:
            paths += [tls.cert, tls.key]
            for entry in tls.sni:
                paths += [entry.cert, entry.key]
        for route in self.routes:
            if route.auth is not None and route.auth.api_keys_file is not None:
                paths.append(route.auth.api_keys_file)
        return tuple(dict.fromkeys(paths))
