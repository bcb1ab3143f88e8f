"""What every front end does with a request around ``Engine.handle``: the steps
from "a request head arrived" to "the engine has it", and the exchange's end.

The HTTP/1.1 server (``trioproxy.server.connection``) and the ASGI app
(``trioproxy.asgi.app``) both drive one :class:`FrontExchange` per request, so
that routing, the edge rules, limits, the proxy's own answers, metrics and the
access log are written once::

    exchange = FrontExchange(engine, head, peer=..., scheme=...)
    answer = exchange.admit(metrics_path)     # metrics_path, route, gate, Content-Length
    if answer is None:
        await exchange.admit_limits(now)      # max_inflight, rate limits (maybe Redis)
        answer = exchange.own_answer(now)     # handler route, respond route, CORS preflight
    if answer is not None:
        ... send it ...
    else:
        with exchange.upstream(tunnel=...):   # the group (and a tunnel) counted open
            await engine.handle(exchange.request, exchange.route, downstream, exchange.record)
    ...
    exchange.end(note)                        # Observer.end, then the access log line
    exchange.release()                        # the route's in-flight place, if it took one

Order, and why:

1. ``[server] metrics_path`` is the proxy's own path: it is answered before any
   route is asked (a route cannot shadow it).
2. The route (``Snapshot.route_for``), else 404.
3. The edge gate (``trioproxy.edge.gate.admit``): the real client IP, access
   rules and API keys (403/401); the head goes on without the key.
4. A declared ``Content-Length`` over the route's ``max_body_size`` is refused
   (413) before any upstream or limit sees the request.
5. The route's limits (``RouteLimits.admit``): they count the head *as the
   client presented it* (its API key, before the gate stripped it) under the
   real client IP. The only step that may wait (a Redis round trip).
6. A ``handler`` route (metrics, health, ping), a ``respond`` route or a CORS
   preflight is answered by the proxy.

Steps 1 to 4 and 6 are sans-I/O: they raise a :class:`~trioproxy.errors.ProxyError`
or return an :class:`~trioproxy.http.answers.Answer`, and the front end writes
either its own way. Nothing here imports trio.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from trioproxy.edge.gate import admit
from trioproxy.edge.limits import RouteLimits
from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import BodyTooLarge, NoRoute
from trioproxy.http.answers import Answer, local_answer
from trioproxy.http.headers import new_request_id, request_id_from
from trioproxy.http.protocol import RequestHead
from trioproxy.observe.access import log_exchange
from trioproxy.observe.handlers import handler_answer, metrics_answer
from trioproxy.snapshot import Route

__all__ = ["FrontExchange", "declared_length_error"]


def declared_length_error(head: RequestHead, limit: int | None) -> BodyTooLarge | None:
    """A ``Content-Length`` over ``limit`` is refused before any upstream sees it."""
    if limit is None:
        return None
    for name, value in head.headers:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return BodyTooLarge(f"Content-Length {value.decode()} over {limit}")
    return None


class FrontExchange:
    """One request's way through a front end (see the module docstring).

    Args:
        engine: whose snapshot routes the request and whose observer counts it.
        head: the request head as the client sent it.
        peer: the client's address as the front end sees it (the TCP peer, or the
            ASGI scope's ``client``).
        scheme: ``http`` or ``https`` as the client spoke it.
    """

    __slots__ = (
        "_admitted",
        "_engine",
        "_presented",
        "_started",
        "body_limit",
        "head",
        "peer",
        "record",
        "request",
        "route",
        "scheme",
    )

    def __init__(self, engine: Engine, head: RequestHead, *, peer: str, scheme: str) -> None:
        self._engine = engine
        self._started = time.perf_counter()
        #: The head as presented (what the rate limits count).
        self._presented = head
        #: The head as it goes on: after the gate, the one the engine gets.
        self.request = head
        #: The head for the access log and the metrics (the request as it goes on,
        #: once admitted; the method and target are the client's either way).
        self.head = head
        self.peer = peer
        self.scheme = scheme
        self.record = ExchangeLog()
        self.route: Route | None = None
        #: The route's ``max_body_size``: what the front end lets the body reach.
        self.body_limit: int | None = None
        self._admitted: RouteLimits | None = None

    @property
    def client_ip(self) -> str:
        """The real client IP: the gate's answer, else the peer's address."""
        return self.record.client_ip or self.peer

    # --- before the engine ------------------------------------------------------------

    def admit(self, metrics_path: bytes | None = None) -> Answer | None:
        """Steps 1 to 4: the metrics page, or the route and the gate's verdict.

        Returns:
            The metrics answer for ``metrics_path``; else None, with ``route``,
            ``request`` and ``body_limit`` set.

        Raises:
            NoRoute (404), AccessDenied (403), KeyMissing / KeyRejected (401),
            BodyTooLarge (413).
        """
        head = self._presented
        if metrics_path is not None and head.target.partition(b"?")[0] == metrics_path:
            return metrics_answer(self._engine.observer, fleet=True)
        snapshot = self._engine.snapshot
        route = (
            None if snapshot is None else snapshot.route_for(head.method, head.target, head.headers)
        )
        if route is None:
            raise NoRoute(head.target.split(b"?", 1)[0].decode("latin-1"))
        assert snapshot is not None
        self.route = route
        record = self.record
        record.route = route.name
        self.request = self.head = admit(
            head, route, snapshot.identity, peer=self.peer, scheme=self.scheme, record=record
        )
        self.body_limit = route.max_body_size
        if (too_large := declared_length_error(self.request, self.body_limit)) is not None:
            raise too_large
        return None

    async def admit_limits(self, now: float) -> None:
        """Step 5: the route's in-flight cap and rate limits; once admitted, the
        place is given back by :meth:`release`.

        Raises:
            RouteBusy (503), RateLimited (429), RateLimitStoreUnavailable (503).
        """
        assert self.route is not None, "admit first"
        limits = self.route.limits
        if limits is None:
            return
        await limits.admit(self._presented.headers, self.client_ip, now)
        self._admitted = limits

    def own_answer(self, now: float) -> Answer | None:
        """Step 6: the answer the proxy gives itself on this route, or None to go
        upstream (then ``route.group`` is set). ``now``: trio time, for health."""
        route = self.route
        assert route is not None, "admit first"
        head = self.request
        record = self.record
        if route.settings.handler is not None:
            record.request_id = request_id_from(head.headers) or new_request_id()
            return handler_answer(
                head,
                route,
                observer=self._engine.observer,
                now=now,
                client_addr=self.client_ip,
                request_id=record.request_id,
                process_time=time.perf_counter() - self._started,
            )
        record.group = route.upstream_name
        if route.group is None or route.cors is not None:
            record.request_id = request_id_from(head.headers) or new_request_id()
            answer = local_answer(
                head, route, client_addr=self.client_ip, request_id=record.request_id
            )
            if answer is not None:
                return answer
            assert route.group is not None
        return None

    @contextmanager
    def upstream(self, *, tunnel: bool = False) -> Iterator[Route]:
        """While the engine has the exchange: its upstream group counted open, so
        that a group a reload removed closes its connections only once its last
        exchange (or tunnel) has ended; a WebSocket ``tunnel`` counted open on its
        route for the metrics."""
        route = self.route
        assert route is not None and route.group is not None
        group = route.group
        observer = self._engine.observer
        tunnels = observer.tunnels if tunnel and observer is not None else None
        group.enter()
        if tunnels is not None:
            tunnels[route.name] = tunnels.get(route.name, 0) + 1
        try:
            yield route
        finally:
            if tunnels is not None:
                tunnels[route.name] -= 1
            group.leave()

    # --- the end ------------------------------------------------------------------------

    def end(self, note: str = "", *, bytes_in: int = 0) -> None:
        """Count the exchange (``Observer.end``) and write its access log line.

        ``note`` says how it ended when not with a whole response; ``bytes_in``:
        the request body bytes the client sent.
        """
        duration = time.perf_counter() - self._started
        record = self.record
        record.bytes_in = bytes_in
        head = self.head
        observer = self._engine.observer
        llm = observer.end(head.method, record, duration) if observer is not None else None
        log_exchange(self.client_ip, head, record, duration, note, llm)

    def release(self) -> None:
        """Give back the route's in-flight place, if the exchange took one (idempotent)."""
        if (admitted := self._admitted) is not None:
            self._admitted = None
            admitted.leave()
