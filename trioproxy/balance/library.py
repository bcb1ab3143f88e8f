"""``HealthChecker`` and ``LoadBalancer`` for trio code, shaped like fastapi-reverse-proxy's.

For users coming from ``fastapi-reverse-proxy``: the same names and calls,
backed by the proxy's own health service and strategies::

    checker = HealthChecker(
        ["http://a:8000", {"host": "http://b:8000", "pingpath": "/v1/status", "maxrequests": 100}],
        interval=10, timeout=10, ping_path="/",
    )
    async with checker:                       # probes every target once on entry
        balancer = LoadBalancer(checker)      # fastest healthy target
        url = balancer.get()                  # "http://a:8000", or None if none is up

    LoadBalancer(["http://a:8000", "http://b:8000"]).get()   # round-robin
    LoadBalancer(urls, strategy="least_connections")           # any strategy by name

A ping is a readiness check of ``ping_path`` (``/`` by default), as in
fastapi-reverse-proxy: it passes on 200-399, or on the statuses given as
``expect`` (``expect=[200]``, ``expect=["200-299", 404]``). The CLI's default
liveness probe (any status below 500 when no health path is configured) is
not the default here: choosing the path to ping is this API's whole point, and
a ping that passed on 404 would change what existing callers' ``pingpath``
checks mean.

Under trio a background task needs a nursery: ``async with checker`` owns it.
``start()`` and ``aclose()`` are the two halves of that ``async with`` and must
be called from the same task, ``start`` first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trioproxy.balance.balancer import Balancer
from trioproxy.balance.health import HealthService
from trioproxy.balance.health_rules import HealthSettings, StatusRanges
from trioproxy.balance.strategies import Fastest, RoundRobin, Strategy, make_strategy
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.errors import NoHealthyUpstream
from trioproxy.http.protocol import RequestHead
from trioproxy.upstream.origin import UpstreamURL

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.websockets import WebSocket

TargetLike = str | Mapping[str, Any]


def _target(item: TargetLike) -> Target:
    if isinstance(item, str):
        return Target(TargetSpec(url=UpstreamURL.parse(item)))
    unknown = set(item) - {"host", "pingpath", "maxrequests", "weight"}
    if unknown or "host" not in item:
        raise ValueError(
            f"target {dict(item)!r}: use keys host (required), pingpath, maxrequests, weight"
        )
    return Target(
        TargetSpec(
            url=UpstreamURL.parse(str(item["host"])),
            health_path=item.get("pingpath"),
            max_inflight=item.get("maxrequests"),
            weight=int(item.get("weight", 1)),
        )
    )


class HealthChecker:
    """Probes a set of targets in the background and knows which answer fastest."""

    def __init__(
        self,
        targets: Sequence[TargetLike],
        interval: float = 10,
        timeout: float = 10,
        ping_path: str = "/",
        *,
        method: str = "HEAD",
        rise: int = 1,
        fall: int = 1,
        expect: StatusRanges | Iterable[int | str] | None = None,
    ) -> None:
        if expect is not None and not isinstance(expect, StatusRanges):
            expect = StatusRanges.of(expect)
        self._targets = [_target(item) for item in targets]
        self._service = HealthService(
            self._targets,
            HealthSettings(
                method=method.encode("ascii"),
                path=ping_path,
                expect=expect,
                interval=interval,
                timeout=timeout,
                rise=rise,
                fall=fall,
            ),
            status_hint="pass ping_path= (or pingpath per target) and expect= with the "
            "statuses it answers",
        )
        self._nursery_manager: Any = None
        self._nursery: trio.Nursery | None = None

    @property
    def ping_path(self) -> str:
        return self._service.settings.path_for(None)

    @ping_path.setter
    def ping_path(self, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"ping_path must start with '/', got {path!r}")
        self._service.settings = attrs.evolve(self._service.settings, path=path)

    @property
    def targets(self) -> list[str]:
        return [t.name for t in self._targets]

    @property
    def target_objects(self) -> list[Target]:
        return self._targets

    async def start(self) -> None:
        """Probe every target once, then keep probing in the background."""
        if self._nursery is not None:
            raise RuntimeError("HealthChecker already started")
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            await self._nursery.start(self._service.run)
        except BaseException as exc:
            await self._close(type(exc), exc, exc.__traceback__)
            raise

    async def aclose(self) -> None:
        """Stop probing (the ``async with`` exit)."""
        await self._close(None, None, None)

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nursery is None:
            return
        self._nursery.cancel_scope.cancel()
        manager, self._nursery_manager, self._nursery = self._nursery_manager, None, None
        await manager.__aexit__(exc_type, exc, tb)

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc_type, exc, tb)

    async def check_all(self) -> None:
        """Probe every target now (as the background loop does each interval)."""
        async with trio.open_nursery() as nursery:
            for target in self._targets:
                nursery.start_soon(self._service._probe_and_judge, target, False)

    def get_healthy_targets(self) -> list[str]:
        return [t.name for t in self._targets if t.healthy]

    def get_response_times(self) -> dict[str, float]:
        """Latency EWMA in seconds of every healthy, measured target."""
        return {t.name: t.latency for t in self._targets if t.healthy and t.latency is not None}

    def get_fastest(self) -> str | None:
        times = self.get_response_times()
        return min(times, key=times.__getitem__) if times else None

    def is_healthy(self, target: str) -> bool:
        for t in self._targets:
            if t.name == target or str(t.url.origin) == target.rstrip("/"):
                return t.healthy
        return False


class LoadBalancer:
    """Round-robin over a list of URLs, or fastest-healthy over a HealthChecker.

    ``strategy`` (a name such as ``"weighted"`` or ``"least_connections"``, or a
    strategy object) overrides the default of either mode.
    """

    def __init__(
        self, servers: Sequence[TargetLike] | HealthChecker, strategy: str | Strategy | None = None
    ) -> None:
        if isinstance(servers, HealthChecker):
            targets = servers.target_objects
            default: Strategy = Fastest()
        else:
            targets = [_target(item) for item in servers]
            default = RoundRobin()
        if isinstance(strategy, str):
            chosen = make_strategy(strategy)
        else:
            chosen = strategy or default
        self.checker = servers if isinstance(servers, HealthChecker) else None
        self._balancer = Balancer(targets, strategy=chosen)

    @property
    def balancer(self) -> Balancer:
        return self._balancer

    def pick(self, request: RequestHead | None = None) -> Target:
        """The next target (raises NoHealthyUpstream, a 503, when there is none)."""
        if self.checker is not None and isinstance(self._balancer.strategy, Fastest):
            fastest = self.checker.get_fastest()
            if fastest is not None:
                for target in self._balancer.targets:
                    if target.name == fastest:
                        return target
        return self._balancer.pick(request, now=trio.current_time())

    def get(self) -> str | None:
        """The next target's URL, or None when none is available."""
        try:
            return self.pick().name
        except NoHealthyUpstream:
            return None

    def peek(self) -> str | None:
        """The URL ``get`` would most likely return, without moving on."""
        if self.checker is not None:
            return self.checker.get_fastest()
        now = trio.current_time()
        for target in self._balancer.targets:
            if self._balancer.available(target, now):
                return target.name
        return None

    # --- fastapi-reverse-proxy's helpers, on trioproxy's engine (trioproxy.asgi) -------

    async def proxy_pass(
        self,
        request: Request,
        path: str | None = None,
        timeout: float = 60.0,  # noqa: ASYNC109  (fastapi-reverse-proxy's signature)
        forward_query: bool = True,
        additional_headers: Mapping[str, str] | None = None,
        override_headers: Mapping[str, str] | None = None,
        override_body: bytes | str | list[Any] | dict[str, Any] | None = None,
        method: str | None = None,
        override_host: str | None = None,
    ) -> Response:
        """:func:`trioproxy.asgi.proxy_pass` to this balancer's targets: each request
        to the target the strategy picks, retried on another where safe (503 with
        ``Retry-After`` when none is healthy)."""
        from trioproxy.asgi.helpers import proxy_pass

        return await proxy_pass(
            request,
            self,
            path=path,
            timeout=timeout,
            forward_query=forward_query,
            additional_headers=additional_headers,
            override_headers=override_headers,
            override_body=override_body,
            method=method,
            override_host=override_host,
        )

    async def proxy_pass_websocket(
        self,
        websocket: WebSocket,
        path: str | None = None,
        subprotocols: list[str] | None = None,
        forward_query: bool = True,
        additional_headers: Mapping[str, str] | None = None,
        override_headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109  (fastapi-reverse-proxy's signature)
    ) -> None:
        """:func:`trioproxy.asgi.proxy_pass_websocket` to this balancer's targets."""
        from trioproxy.asgi.helpers import proxy_pass_websocket

        await proxy_pass_websocket(
            websocket,
            self,
            path=path,
            subprotocols=subprotocols,
            forward_query=forward_query,
            additional_headers=additional_headers,
            override_headers=override_headers,
            timeout=timeout,
        )
