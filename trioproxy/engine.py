"""The one proxy path, shared by every front end.

``Engine.handle`` takes a request head and a :class:`Downstream` (the front
end's side of the exchange: the request body source and the response sink)
and relays one exchange to an upstream::

    request head ─► balancer.pick() ─► pool.connection(origin)
                                         │
             ┌── send request head, pump request body, then watch the client
    nursery ─┤
             └── read response head ─► client, pump response body ─► client

Either side ending badly cancels the other. The upstream connection is marked
clean (and so goes back to the pool) only if the request was sent whole and the
response was read to its end without anything being cancelled.

The fast path skips the nursery: a request without a body is sent in one write,
and a response that arrives whole within ``_FAST_WINDOW`` (100 ms) is answered
in one write, with no second task and no watch on the client socket (that watch
costs syscalls; a client that leaves is noticed within the window anyway).
After sending, the task yields once before it looks for the response: under
load the other connections' work covers the upstream's latency, and the
response is then taken as it is, with no timeout scope and no wait.

Retries: an attempt that fails before the upstream saw the request goes to
another target; an idempotent request with a replayable body (recorded up to
``RetryPolicy.replay_limit``) also after a 502/503/504, a timeout or a close
before the head. Never once a response byte reached the client; backoff with
full jitter and a retry budget bound them. Every attempt reports its outcome to
the balancer (breaker, passive health, latency EWMA).

Errors before the response head reached the client propagate as
:class:`~trioproxy.errors.ProxyError` for the front end to answer with their
status; after that, an upstream failure is
:class:`~trioproxy.errors.UpstreamBrokenMidBody` and the front end aborts the
client connection, so a truncated body is never taken for a whole one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from trioproxy.balance.group import LiveGroup
from trioproxy.balance.target import Target
from trioproxy.errors import (
    BadWebSocketRequest,
    BodyTooLarge,
    ClientDisconnected,
    NoHealthyUpstream,
    PoolTimeout,
    ProxyError,
    UpstreamBrokenMidBody,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
)
from trioproxy.http.headers import (
    FieldEdit,
    client_response_headers,
    get_first,
    new_request_id,
    reason_phrase,
    request_id_from,
    upstream_request_headers,
    via_entry,
)
from trioproxy.http.protocol import (
    NEED_DATA,
    Body,
    EndOfMessage,
    Event,
    Headers,
    RequestHead,
    ResponseHead,
    _Sentinel,
)
from trioproxy.http.transforms import (
    BodyTransformError,
    FieldEditor,
    TemplateValues,
    format_process_time,
    run_body_transform,
)
from trioproxy.relay_hub import ClientSink, HubStream, StreamHub
from trioproxy.relay_hub import supported as hub_supported
from trioproxy.snapshot import Route, Snapshot
from trioproxy.sockets import FastSocketStream
from trioproxy.upstream.connection import SLOW_CLIENT_WRITE, UpstreamConnection
from trioproxy.upstream.origin import Origin
from trioproxy.upstream.websocket import (
    HANDSHAKE_FIELDS,
    Accepted,
    Refused,
    UpstreamWebSocket,
    connect_upstream_websocket,
)

if TYPE_CHECKING:
    from trioproxy.observe.meter import LlmMeter
    from trioproxy.observe.observer import Observer

log = logging.getLogger("trioproxy.engine")

#: How long the fast path waits for a whole response before it also watches the
#: client (the longest a client that left goes unnoticed).
_FAST_WINDOW = 0.1

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class Downstream(Protocol):
    """The front end's half of one exchange."""

    client_addr: str
    scheme: str

    def request_has_body(self) -> bool: ...

    async def receive_body(self) -> bytes:
        """The next chunk of the request body; ``b""`` once it ended.

        Raises:
            ClientDisconnected, ClientTimeout, ProtocolError, BodyTooLarge.
        """

    async def wait_disconnect(self) -> None:
        """Return only by raising ClientDisconnected when the client goes away."""

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        """The response head (if any), body chunks, and its end (if ``end``), written
        together."""

    def hub_sink(self) -> ClientSink | None:
        """The client's socket and body framing, for the stream hub to write to; None
        if the hub cannot (TLS, memory streams)."""


class WebSocketDownstream(Protocol):
    """The front end's half of a WebSocket upgrade (``Engine.handle_websocket``):
    the client's side of the handshake, and its frames or messages once accepted.

    The engine opens the upstream WebSocket (pick, retry, headers, transforms)
    and then calls exactly one of: ``send_parts`` (the upstream refused: relay
    its answer as an HTTP response), or ``accept`` followed by ``relay``.
    """

    client_addr: str
    scheme: str

    async def wait_disconnect(self) -> None:
        """Return only by raising ClientDisconnected when the client goes away."""

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        """The upstream's refusal (head, body chunks, end), relayed to the client."""

    async def accept(self, subprotocol: str | None, headers: Headers) -> None:
        """Complete the client's handshake with the upstream's ``subprotocol`` and
        ``headers`` (its ``101``'s other fields, already made the client's).

        Raises:
            ClientDisconnected.
        """

    async def relay(self, upstream: UpstreamWebSocket, early: bytes) -> str:
        """Relay frames between the client and ``upstream`` (whose first bytes,
        read with its ``101``, are ``early``) until both are done; returns a note
        for the access log saying how it ended."""


@attrs.define
class ExchangeLog:
    """What happened, for the access log."""

    request_id: bytes = b""
    route: str = "-"
    upstream: str = "-"
    status: int = 0
    bytes_out: int = 0
    started: float = 0.0  # trio time the exchange began (its request head was read)
    head_at: float = 0.0  # trio time the response head arrived
    #: The header templates' values, when the route's rules use any.
    values: TemplateValues | None = None
    #: The client's ``Origin``, when the route has a CORS policy.
    origin: bytes | None = None
    #: The real client IP when the front end resolved one (``trioproxy.edge.identity``);
    #: empty: the peer address is the client's.
    client_ip: str = ""
    #: The scheme and host a trusted proxy in front says the client used
    #: (``X-Forwarded-Proto``, ``-Host``); None: the proxy's own view.
    client_proto: str | None = None
    client_host: bytes | None = None
    #: The route's upstream group ("" for an answer the proxy made).
    group: str = ""
    #: Attempts beyond the first.
    retries: int = 0
    #: Request body bytes received from the client.
    bytes_in: int = 0
    #: The LLM stream meter, when the exchange is an LLM request (see trioproxy.observe).
    llm: LlmMeter | None = None


@attrs.define
class _RequestSide:
    client_error: ProxyError | None = None
    sent: bool = False


class _ReplayableBody:
    """The request body source, recorded so that a retry can send it again.

    Chunks are kept while the body stays within ``limit`` bytes (0 for a
    request that may not be retried); past that the recording is dropped and
    the body is no longer replayable. Memory stays bounded by ``limit``.
    """

    __slots__ = (
        "_chunks",
        "_done",
        "_downstream",
        "_limit",
        "_overflow",
        "_replay",
        "_size",
        "present",
        "started",
    )

    def __init__(self, downstream: Downstream, limit: int) -> None:
        self._downstream = downstream
        #: The request declares a body (asked once: it scans the headers).
        self.present = downstream.request_has_body()
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._overflow = False
        self._replay: int | None = None
        self.started = False

    @property
    def replayable(self) -> bool:
        """Nothing was read yet, or all of it was read and recorded."""
        return not self.started or (self._done and not self._overflow)

    def rewind(self) -> None:
        if self.started:
            assert self.replayable
            self._replay = 0

    async def receive(self) -> bytes:
        if self._replay is not None:
            if self._replay < len(self._chunks):
                self._replay += 1
                return self._chunks[self._replay - 1]
            return b""
        data = await self._downstream.receive_body()
        self.started = True
        if not data:
            self._done = True
        elif not self._overflow:
            self._size += len(data)
            if self._size > self._limit:
                self._overflow = True
                self._chunks.clear()
            else:
                self._chunks.append(data)
        return data


class _Unsent(Exception):
    """An attempt failed before the upstream saw the request (may go elsewhere)."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class _Failed(Exception):
    """An attempt failed after sending, before any response byte reached the client."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class _DiscardedResponse(UpstreamError):
    """A retryable 5xx head, read and not relayed, so that the request may go elsewhere."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


@attrs.define
class Engine:
    """The proxy path as a service: ``await nursery.start(engine.run)``, then
    ``activate(snapshot)`` and ``handle(request, route, downstream, record)``.

    It owns what outlives one exchange: the stream hub, and the upstream groups
    of the snapshots it serves (their health probers run in its nursery, their
    pools are closed when it stops).
    """

    rng: random.Random = attrs.Factory(random.Random)
    #: Relays streamed response bodies in one task (see ``_relay_rest``); None: every
    #: body is relayed by its exchange's own task.
    hub: StreamHub | None = None
    #: trio's clock: ``trio.current_time``, or the same reading straight from the
    #: run's clock (see ``Engine.run``).
    current_time: Callable[[], float] = trio.current_time
    #: The snapshot new requests are routed on.
    snapshot: Snapshot | None = None
    #: Whether ``run`` starts the stream hub; it also stays off where the platform
    #: cannot run it (no ``select.epoll``: macOS, Windows), and every body is then
    #: relayed by its exchange's own task.
    use_hub: bool = True
    #: Why the last reload was refused (None after a good one), for ``/status``.
    config_error: str | None = None
    _nursery: trio.Nursery | None = None
    #: Metrics and the LLM meter (trioproxy.observe.observer); None: off.
    observer: Observer | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; the groups' pools are closed on the way out."""
        # The hot path reads the clock ~7 times per request. trio.current_time()
        # is the run's clock.current_time() behind KI protection and a run-context
        # lookup (~2.1k instructions; ~0.65k for the clock's own method): take the
        # method once per run. Same clock, same readings (and tests' MockClock too).
        self.current_time = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as nursery:
                if self.use_hub and hub_supported():
                    # Streamed response bodies are relayed by this one task (see
                    # trioproxy/relay_hub.py); it outlives every exchange.
                    hub = StreamHub()
                    await nursery.start(hub.run)
                    self.hub = hub
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.hub = None
            self._nursery = None
            if self.snapshot is not None:
                for group in self.snapshot.groups.values():
                    await group.pool.aclose()

    async def activate(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on.

        The health probers of its new groups start first, and their first round
        ends before this returns. Groups of the previous snapshot that it does
        not carry are retired: they stop probing, take no new exchange, and
        close their connections when their last exchange ends.
        """
        nursery = self._nursery
        assert nursery is not None, "Engine.run is not running"
        old = list(self.snapshot.groups.values()) if self.snapshot is not None else []
        new = list(snapshot.groups.values())
        for group in new:
            if group not in old:
                group.pool.current_time = self.current_time
                await nursery.start(self._serve_group, group)
        self.snapshot = snapshot
        for group in old:
            if group not in new:
                group.retire()

    async def _serve_group(
        self, group: LiveGroup, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A group's probers until it is retired; then its pool, once it is done."""
        with group.scope:
            if group.settings.health.enabled and group.balancer.targets:
                await group.health.run(task_status=task_status)
            else:
                task_status.started()
                await trio.sleep_forever()
        await group.done.wait()
        await group.pool.aclose()
        log.info("upstream group %s retired, its connections closed", group.name)

    async def handle(
        self, request: RequestHead, route: Route, downstream: Downstream, record: ExchangeLog
    ) -> None:
        """Relay one exchange, retrying on other targets where that is safe.

        A request goes to another target when the upstream never saw it
        (connect error, pool timeout) or, for an idempotent method whose body
        was replayable, when the upstream answered 502/503/504, timed out or
        closed before a response head. Never after any response byte went to
        the client. Retries are spaced by jittered backoff and capped by the
        retry budget. See the module docstring for what it raises.
        """
        # Kept when the front end already took it (a CORS route asks before it comes here).
        if not record.request_id:
            record.request_id = request_id_from(request.headers) or new_request_id()
        record.started = self.current_time()
        group = route.group
        assert group is not None, "a respond route is answered by the front end"
        if route.has_transforms:
            request = self.prepare_request(request, route, downstream.client_addr, record)
            if route.body_transform is not None and downstream.request_has_body():
                request, downstream = await _transform_body(request, route, downstream)
        if (observer := self.observer) is not None and (
            meter := observer.start(request, route, record)
        ) is not None:
            # An LLM request: the meter sees the request body and each response chunk.
            request, downstream = await meter.attach(request, downstream)
        policy = group.retry
        budget = group.budget
        balancer = group.balancer
        idempotent = request.method in IDEMPOTENT
        body = _ReplayableBody(downstream, policy.replay_limit if idempotent else 0)
        chunked = body.present and get_first(request.headers, b"content-length") is None
        tried: list[Target] = []
        budget.record_request(record.started)
        last_error: ProxyError | None = None
        for attempt in range(policy.max_attempts):
            now = self.current_time()
            if attempt:
                retry = await self._retry_target(group, request, tried, attempt, record, last_error)
                if retry is None:
                    break
                target = retry
                body.rewind()
            else:
                target = balancer.pick(request, now=now)
            tried.append(target)
            record.upstream = target.name
            last = attempt + 1 >= policy.max_attempts

            def retry_status(status: int, last: bool = last) -> bool:
                return (
                    not last
                    and idempotent
                    and status in policy.retry_on_status
                    and body.replayable
                    and budget.can_retry(self.current_time())
                    and balancer.has_candidate(self.current_time(), exclude=tried)
                )

            try:
                await self._attempt(
                    route, target, request, chunked, body, downstream, record, retry_status
                )
                return
            except _Unsent as exc:
                last_error = exc.error
            except _Failed as exc:
                last_error = exc.error
                if not (idempotent and body.replayable):
                    raise exc.error from None
        assert last_error is not None
        raise last_error

    async def handle_websocket(
        self,
        request: RequestHead,
        route: Route,
        downstream: WebSocketDownstream,
        record: ExchangeLog,
        subprotocols: list[str],
    ) -> str | None:
        """Open a WebSocket to an upstream for ``request`` and hand it to the client.

        The same path as ``handle``: the route's path rewrite and request header
        rules, the group's balancer, its retry rules (a target that refuses the
        connection is left for another one: the upstream never saw the request)
        and the balancer's outcome accounting. Then the upstream's handshake with
        the client's ``subprotocols`` (deferred negotiation: the client is
        accepted only with the upstream's choice); a refusal is relayed as a
        plain HTTP response (``downstream.send_parts``).

        Returns:
            None when the upstream refused and its answer was relayed; otherwise
            ``"websocket: "`` and the tunnel's note on how it ended.

        Raises:
            ProxyError: before anything was sent to the client (502 connect error
                or invalid answer, 503 no target, 504 timeout, 400 non-ASCII
                target); ClientDisconnected; UpstreamBrokenMidBody while relaying
                a refusal's body.
        """
        if not record.request_id:
            record.request_id = request_id_from(request.headers) or new_request_id()
        record.started = self.current_time()
        group = route.group
        assert group is not None, "a respond route is answered by the front end"
        sent = request
        if route.has_transforms:
            sent = self.prepare_request(request, route, downstream.client_addr, record)
        balancer = group.balancer
        group.budget.record_request(record.started)
        tried: list[Target] = []
        error: ProxyError | None = None
        upstream: UpstreamWebSocket | None = None
        target: Target | None = None
        for attempt in range(group.retry.max_attempts):
            if attempt:
                target = await self._retry_target(group, request, tried, attempt, record, error)
                if target is None:
                    break
            else:
                target = balancer.pick(request, now=self.current_time())
            tried.append(target)
            record.upstream = target.name
            try:
                upstream = await connect_upstream_websocket(
                    target.url.origin, group.pool, connect_timeout=route.connect_timeout
                )
                break
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                balancer.on_failure(target, self.current_time())
                error = exc
            except BaseException:
                balancer.on_cancelled(target, self.current_time())
                raise
        if upstream is None:
            assert error is not None
            raise error
        assert target is not None
        reported = False
        try:
            url = target.url
            fields = self.upstream_headers(
                RequestHead(sent.method, sent.target, sent.headers, b"1.1"),
                route,
                url.origin,
                downstream,
                record,
            )
            host = get_first(fields, b"host") or url.origin.host_header
            upstream_target = url.upstream_target(sent.target)
            if not (host.isascii() and upstream_target.isascii()):
                raise BadWebSocketRequest("non-ASCII Host or request-target in a WebSocket upgrade")
            started = self.current_time()
            with balancer.track(target):
                answer = await _upstream_handshake(
                    upstream,
                    downstream,
                    host=host,
                    target=upstream_target,
                    headers=[field for field in fields if field[0] not in HANDSHAKE_FIELDS],
                    subprotocols=subprotocols,
                    read_timeout=route.read_timeout,
                )
            status = answer.status if isinstance(answer, Refused) else 101
            now = self.current_time()
            if status >= 500:
                balancer.on_failure(target, now)
            else:
                balancer.on_success(target, now, latency=now - started)
            reported = True
            record.status = status
            if isinstance(answer, Refused):
                await _relay_refusal(answer, upstream, downstream, record, route.read_timeout)
                return None
            passed = [field for field in answer.headers if field[0] not in HANDSHAKE_FIELDS]
            await downstream.accept(
                answer.subprotocol,
                client_response_headers(
                    passed, request_id=record.request_id, via=via_entry(b"1.1")
                ),
            )
            with balancer.track(target, tunnel=True):
                note = await downstream.relay(upstream, answer.trailing_data)
            return f"websocket: {note}"
        except (UpstreamError, UpstreamTimeout):
            if not reported:
                balancer.on_failure(target, self.current_time())
            raise
        except BaseException:
            if not reported:
                balancer.on_cancelled(target, self.current_time())
            raise
        finally:
            await upstream.aclose()

    async def _retry_target(
        self,
        group: LiveGroup,
        request: RequestHead,
        tried: list[Target],
        attempt: int,
        record: ExchangeLog,
        last_error: ProxyError | None,
    ) -> Target | None:
        """The target of retry number ``attempt`` (1, 2...), after its backoff; None
        when the retry budget or the candidates left say not to retry.

        Shared by HTTP exchanges (``handle``) and WebSocket upgrades
        (``handle_websocket``), so that both retry by the same rules.
        """
        now = self.current_time()
        budget = group.budget
        balancer = group.balancer
        if not budget.can_retry(now) or not balancer.has_candidate(now, exclude=tried):
            return None
        budget.record_retry(now)
        # Back off first, then pick: the choice (and a breaker's trial
        # slot) is made when the request really goes out.
        await trio.sleep(group.retry.backoff(attempt - 1, self.rng))
        try:
            target = balancer.pick(request, now=self.current_time(), exclude=tried)
        except NoHealthyUpstream:
            return None
        record.retries += 1
        log.info("retrying %s on %s: %s", record.request_id.decode(), target.name, last_error)
        return target

    def upstream_headers(
        self,
        request: RequestHead,
        route: Route,
        origin: Origin,
        downstream: Downstream | WebSocketDownstream,
        record: ExchangeLog,
    ) -> Headers:
        """The request's header fields as they go to ``origin``: hop-by-hop fields
        removed, ``X-Forwarded-*``, ``Via`` and ``X-Request-ID`` set, then the
        route's request header rules (for HTTP exchanges and WebSocket upgrades)."""
        group = route.group
        assert group is not None
        editor = route.request_editor
        edit = None
        if editor is not None:
            values = record.values
            if values is None and editor.placeholders:  # only values the engine has
                client_ip = record.client_ip or downstream.client_addr
                edit = editor.edit_known(record.request_id, client_ip.encode("latin-1"), b"", b"")
            else:
                edit = editor.edit(values)
        return upstream_request_headers(
            request.headers,
            client_addr=downstream.client_addr,
            scheme=record.client_proto or downstream.scheme,
            upstream_host=origin.host_header,
            preserve_host=group.preserve_host,
            request_id=record.request_id,
            via=via_entry(request.http_version),
            x_forwarded=route.x_forwarded,
            edit=edit,
            forwarded_host=record.client_host,
        )

    async def _attempt(
        self,
        route: Route,
        target: Target,
        request: RequestHead,
        chunked: bool,
        body: _ReplayableBody,
        downstream: Downstream,
        record: ExchangeLog,
        retry_status: Callable[[int], bool],
    ) -> None:
        """One try on one target, with the outcome reported to the balancer."""
        origin = target.url.origin
        group = route.group
        assert group is not None
        headers = self.upstream_headers(request, route, origin, downstream, record)
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        upstream_request = RequestHead(
            method=request.method,
            target=target.url.upstream_target(request.target),
            headers=headers,
        )
        balancer = group.balancer
        started = self.current_time()
        target.inflight += 1  # balancer.track, inlined on the hot path
        try:
            try:
                await self._on_pooled_connection(
                    route, origin, upstream_request, body, downstream, record, retry_status
                )
            except (UpstreamConnectError, UpstreamConnectTimeout) as exc:
                balancer.on_failure(target, self.current_time())
                raise _Unsent(exc) from None
            except PoolTimeout as exc:
                balancer.on_cancelled(target, self.current_time())
                raise _Unsent(exc) from None
            except UpstreamBrokenMidBody:
                balancer.on_failure(target, self.current_time())
                raise
            except (UpstreamError, UpstreamTimeout) as exc:
                # Before any response byte reached the client.
                balancer.on_failure(target, self.current_time())
                if isinstance(exc, _DiscardedResponse):
                    exc = UpstreamError(exc.detail)
                raise _Failed(exc) from None
            except BaseException:
                balancer.on_cancelled(target, self.current_time())
                raise
        finally:
            target.inflight -= 1
        now = self.current_time()
        if record.status >= 500:
            balancer.on_failure(target, now)
        else:
            balancer.on_success(target, now, latency=record.head_at - started)

    async def _on_pooled_connection(
        self,
        route: Route,
        origin: Origin,
        request: RequestHead,
        body: _ReplayableBody,
        downstream: Downstream,
        record: ExchangeLog,
        retry_status: Callable[[int], bool],
    ) -> None:
        fresh = False
        assert route.group is not None
        pool = route.group.pool
        while True:
            async with pool.connection(
                origin, fresh=fresh, connect_timeout=route.connect_timeout
            ) as conn:
                try:
                    await self._exchange(
                        route, conn, request, body, downstream, record, retry_status
                    )
                    return
                except UpstreamClosed:
                    # A keep-alive connection the server closed just as we picked
                    # it: the request was never processed. Try once more on a new
                    # connection, where that is safe (RFC 9112 §9.3.1).
                    if fresh or not conn.reused or request.method not in IDEMPOTENT:
                        raise
                    if not body.replayable:
                        raise
            body.rewind()
            fresh = True

    async def _exchange(
        self,
        route: Route,
        conn: UpstreamConnection,
        request: RequestHead,
        body: _ReplayableBody,
        downstream: Downstream,
        record: ExchangeLog,
        retry_status: Callable[[int], bool],
    ) -> None:
        """One request/response on ``conn``.

        Fast path, for a request without a body: send it in one write and wait
        a little (``_FAST_WINDOW``) for the response; if it arrives whole, answer
        in one write. Most API answers take this path, which needs no second
        task and no watch on the client socket. Anything else (a body to pump,
        a slow upstream, a streamed response) continues on the general path,
        where the request side and the response side run in one nursery.
        """
        head: ResponseHead | None = None
        chunks: list[bytes] = []
        end = False
        sent = False
        read_timeout = route.read_timeout
        if not body.present:
            await body.receive()  # b"": the request is complete
            protocol = conn.protocol
            await conn.send_mapped(protocol.send_head(request) + protocol.send_end())
            sent = True
            # Let the other connections run while the upstream answers: under
            # load its response is here by then, and is taken without a timeout
            # scope or a wait on the socket.
            await trio.lowlevel.checkpoint()
            event = conn.next_event_nowait()
            if event is not NEED_DATA:
                head = self._client_head(route, conn, event, record, retry_status)
            else:
                # One scope for both limits when the read timeout is the longer one.
                inner = None if read_timeout > _FAST_WINDOW else read_timeout
                with trio.move_on_after(_FAST_WINDOW):
                    head = await self._read_head(route, conn, record, retry_status, inner)
            if head is not None:
                chunks, end = _parsed_body(conn, record)
            if end:
                assert head is not None
                await downstream.send_parts(head, chunks, True)
                conn.clean = True
                return

        side = _RequestSide(sent=sent)
        error: ProxyError | None = None
        relayed = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                self._send_request, conn, request, body, downstream, side, nursery.cancel_scope
            )
            try:
                if head is None:
                    # The fast window counted against the upstream's idle time.
                    wait = read_timeout - _FAST_WINDOW if sent else read_timeout
                    head = await self._read_head(route, conn, record, retry_status, wait)
                    chunks, end = _parsed_body(conn, record)
                await self._relay_rest(read_timeout, conn, downstream, record, head, chunks, end)
                relayed = True
            except ProxyError as exc:
                error = exc
            nursery.cancel_scope.cancel()
        # Raised with no reference left behind: an exception held by a local of
        # a frame in its own traceback is a reference cycle, which took the
        # sockets, parsers and tasks of every failed exchange to the cyclic GC.
        if (client_error := side.client_error) is not None:
            side.client_error = None
            if relayed and side.sent and type(client_error) is ClientDisconnected:
                # The client closed once it had the whole response, and the watcher
                # ran before this task did (the hub ends a stream from its own task):
                # the exchange is complete, and the upstream connection clean.
                del client_error
                conn.clean = True
                return
            try:
                raise client_error
            finally:
                del client_error, error
        if error is not None:
            try:
                raise error
            finally:
                del error
        conn.clean = side.sent

    async def _send_request(
        self,
        conn: UpstreamConnection,
        request: RequestHead,
        body: _ReplayableBody,
        downstream: Downstream,
        side: _RequestSide,
        cancel_scope: trio.CancelScope,
    ) -> None:
        """Send the request (unless sent already), then watch for the client leaving.

        Never raises. A client-side failure is recorded and cancels the
        exchange; an upstream write failure only stops the sending: the
        response side then learns what the upstream did (it may well have
        answered, e.g. 413, before closing).
        """
        protocol = conn.protocol
        try:
            if not side.sent:
                await conn.send_mapped(protocol.send_head(request))
                # Read the body source to its end even when the request has no
                # body: that is how the front end learns the request is complete.
                while data := await body.receive():
                    await conn.send_mapped(protocol.send_body(data))
                await conn.send_mapped(protocol.send_end())
                side.sent = True
            await downstream.wait_disconnect()
        except UpstreamError:
            pass  # the response side learns what the upstream did
        except ProxyError as exc:
            side.client_error = exc
            cancel_scope.cancel()

    async def _read_head(
        self,
        route: Route,
        conn: UpstreamConnection,
        record: ExchangeLog,
        retry_status: Callable[[int], bool],
        read_timeout: float | None,
    ) -> ResponseHead:
        """The upstream's response head, made into the client's.

        Raises:
            _DiscardedResponse: a 5xx that will be retried elsewhere (not relayed).
            UpstreamClosed, UpstreamTimeout, UpstreamProtocolError.
        """
        event = await conn.next_event(read_timeout)
        return self._client_head(route, conn, event, record, retry_status)

    def _client_head(
        self,
        route: Route,
        conn: UpstreamConnection,
        event: Event | _Sentinel,
        record: ExchangeLog,
        retry_status: Callable[[int], bool],
    ) -> ResponseHead:
        """The client's response head, made from the upstream's (see ``_read_head``)."""
        if not isinstance(event, ResponseHead):
            raise UpstreamClosed(f"{conn.origin}: expected a response head, got {event!r}")
        record.head_at = self.current_time()
        if event.status_code >= 500 and retry_status(event.status_code):
            raise _DiscardedResponse(event.status_code)
        record.status = event.status_code
        headers = event.headers
        if get_first(headers, b"transfer-encoding") is not None:
            # RFC 9112 §6.3 item 3: Transfer-Encoding overrides Content-Length,
            # and a proxy must remove the latter before forwarding.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        editor = route.response_editor
        headers = client_response_headers(
            headers,
            request_id=record.request_id,
            via=via_entry(event.http_version),
            edit=None if editor is None else self._response_edit(editor, record),
        )
        if route.cors is not None:
            headers = route.cors.response_headers(record.origin, headers)
        return ResponseHead(
            status_code=event.status_code,
            headers=headers,
            reason=event.reason or reason_phrase(event.status_code),
        )

    def _response_edit(self, editor: FieldEditor, record: ExchangeLog) -> FieldEdit:
        """The route's response header rules with this exchange's values (CORS
        fields come after them)."""
        values = record.values
        needed = editor.placeholders
        if values is None and needed:  # only values the engine has
            return editor.edit_known(
                record.request_id,
                b"",  # {client_ip} on responses: the route makes values
                record.upstream.encode("latin-1") if "server" in needed else b"",
                format_process_time(record.head_at - record.started)
                if "process_time" in needed
                else b"",
            )
        if values is not None:
            if "server" in needed:
                values.server = record.upstream.encode("latin-1")
            if "process_time" in needed:
                values.process_time = format_process_time(record.head_at - record.started)
        return editor.edit(values)

    def prepare_request(
        self, request: RequestHead, route: Route, client_addr: str, record: ExchangeLog
    ) -> RequestHead:
        """The request as the route sends it upstream: path rewritten (with
        ``X-Forwarded-Prefix`` for a stripped prefix); the template values and the
        ``Origin`` the response side needs are kept in ``record``. The header
        rules themselves are applied per attempt, on the headers made for it."""
        headers = request.headers
        if route.cors is not None:
            record.origin = get_first(headers, b"origin")
        if route.values_from_request:
            record.values = route.template_values(
                request, record.client_ip or client_addr, record.request_id
            )
        if route.rewrite is None:
            return request
        target, prefix = route.rewrite.apply(request.target)
        if prefix is not None:
            for name, _ in headers:
                if name == b"x-forwarded-prefix":
                    headers = [(n, v) for n, v in headers if n != b"x-forwarded-prefix"]
                    headers.append((b"x-forwarded-prefix", prefix))
                    break
            else:  # the client sent none
                headers = [*headers, (b"x-forwarded-prefix", prefix)]
        return RequestHead(request.method, target, headers, request.http_version)

    async def _relay_rest(
        self,
        read_timeout: float,
        conn: UpstreamConnection,
        downstream: Downstream,
        record: ExchangeLog,
        head: ResponseHead,
        chunks: list[bytes],
        end: bool,
    ) -> None:
        """Send the head with what of the body came with it, then one write per read:
        nothing waits for more data before it is sent.

        The read timeout is one cancel scope for the whole body whose deadline
        trails the last read or write by between ``read_timeout`` and
        ``read_timeout * (1 + 1/16)``: moving a trio deadline costs a heap push
        and a context manager, so it moves only when the slack is used up (once
        per ``read_timeout / 16`` of a busy stream, not once per chunk). A write
        to the client that takes no byte for as long counts against the client
        (it is cut, as nginx's ``send_timeout`` does), not the upstream. A write that
        takes over ``SLOW_CLIENT_WRITE`` keeps the reads of the rest of the body at
        their smallest (``UpstreamConnection.client_is_slow``): a client that does
        not keep up holds 64 KiB of the proxy's memory while it catches up, not 256.

        A *stream* goes to the stream hub (``self.hub``) the first time relaying
        it has to wait for the upstream: a body without a Content-Length, both
        sides plain TCP. Measured on 1000 SSE streams (``bench/floor.py``), one
        task relaying them all costs half the CPU per event of a task per stream
        and passes a burst of events several times sooner. A body of known length
        (a download) stays here: its data is there whenever it is read, and
        this path is already at nginx's speed for it.
        """
        await downstream.send_parts(head, chunks, end)
        if end:
            return
        hub = self.hub
        sink: ClientSink | None = None
        upstream_stream = conn.stream
        if (
            hub is not None
            and hub.running
            and type(upstream_stream) is FastSocketStream
            and get_first(head.headers, b"content-length") is None
        ):
            sink = downstream.hub_sink()
        timeout = read_timeout
        slack = timeout / 16
        deadline = self.current_time() + timeout
        reading = trio.CancelScope(deadline=deadline)
        sending = False
        try:
            with reading:
                while not end:
                    if sink is None:
                        event = await conn.next_event(None)
                    elif (ready := conn.next_event_nowait()) is NEED_DATA:
                        break  # the upstream paces this body: a stream, for the hub
                    else:
                        event = ready  # type: ignore[assignment]
                    if type(event) is Body:
                        record.bytes_out += len(event.data)
                        chunks, end = _parsed_body(conn, record)
                        chunks.insert(0, event.data)
                    elif type(event) is EndOfMessage:
                        chunks, end = [], True
                    else:
                        raise UpstreamClosed(f"{conn.origin}: unexpected {event!r} in body")
                    if (now := self.current_time()) + timeout > deadline:
                        reading.deadline = deadline = now + timeout + slack
                    sending = True
                    await downstream.send_parts(None, chunks, end)
                    sending = False
                    if (after := self.current_time()) - now > SLOW_CLIENT_WRITE:
                        conn.client_is_slow()
                    if after + timeout > deadline:
                        reading.deadline = deadline = after + timeout + slack
        except UpstreamError as exc:
            raise UpstreamBrokenMidBody(f"{conn.origin}: {exc.detail}") from None
        if reading.cancelled_caught:
            if sending:
                raise ClientDisconnected(f"the client took no data for {timeout} s")
            raise UpstreamBrokenMidBody(f"{conn.origin}: no data for {timeout} s")
        if end:
            return
        assert hub is not None and sink is not None and type(upstream_stream) is FastSocketStream
        log.debug("%s: the body is a stream, relayed by the hub", record.request_id.decode())
        stream = HubStream(
            upstream_stream.socket,
            conn.protocol,
            sink,
            origin=str(conn.origin),
            last_progress=self.current_time(),
        )
        try:
            await hub.relay(stream, timeout)
        finally:
            record.bytes_out += stream.body_bytes


async def _upstream_handshake(
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    **handshake: Any,
) -> Accepted | Refused:
    """The upstream's handshake, cancelled if the client leaves meanwhile."""
    answer: Accepted | Refused | None = None
    error: ProxyError | None = None
    client_gone = False

    async def watch_client(cancel_scope: trio.CancelScope) -> None:
        nonlocal client_gone
        try:
            await downstream.wait_disconnect()
        except ClientDisconnected:
            client_gone = True
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_client, nursery.cancel_scope)
        try:
            answer = await upstream.handshake(**handshake)
        except ProxyError as exc:
            error = exc
        nursery.cancel_scope.cancel()
    if client_gone:
        raise ClientDisconnected("client left during the upstream WebSocket handshake")
    if error is not None:
        raise error
    assert answer is not None
    return answer


async def _relay_refusal(
    answer: Refused,
    upstream: UpstreamWebSocket,
    downstream: WebSocketDownstream,
    record: ExchangeLog,
    read_timeout: float,
) -> None:
    """The upstream's non-101 answer, relayed as the response to the client's request."""
    headers = answer.headers
    if get_first(headers, b"transfer-encoding") is not None:
        # RFC 9112 §6.3 item 3, as for any response.
        headers = [field for field in headers if field[0] != b"content-length"]
    head = ResponseHead(
        answer.status,
        client_response_headers(headers, request_id=record.request_id, via=via_entry(b"1.1")),
        reason_phrase(answer.status),
    )
    if not answer.has_body:
        await downstream.send_parts(head, [], True)
        return
    await downstream.send_parts(head, [], False)
    try:
        while data := await upstream.receive_refusal_body(read_timeout):
            record.bytes_out += len(data)
            await downstream.send_parts(None, [data], False)
    except (UpstreamError, UpstreamTimeout) as exc:
        raise UpstreamBrokenMidBody(exc.detail) from None
    await downstream.send_parts(None, [], True)


async def _transform_body(
    request: RequestHead, route: Route, downstream: Downstream
) -> tuple[RequestHead, Downstream]:
    """Buffer the request body (up to ``body_transform_limit``, else 413), run the
    route's body transform on it (500 if it fails), and frame the result with its
    own ``Content-Length``."""
    assert route.body_transform is not None
    headers = request.headers
    body = await _buffer_body(downstream, route.settings.body_transform_limit)
    content_type = (get_first(headers, b"content-type") or b"").decode("latin-1")
    try:
        body = await run_body_transform(route.body_transform, body, content_type)
    except BodyTransformError as exc:
        log.error(
            "route %s: body_transform %s: %s", route.name, route.settings.body_transform, exc.detail
        )
        raise
    headers = [(n, v) for n, v in headers if n not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(len(body)).encode()))
    request = RequestHead(request.method, request.target, headers, request.http_version)
    return request, _BufferedDownstream(downstream, body)


async def _buffer_body(downstream: Downstream, limit: int) -> bytes:
    """The whole request body, read before it is sent on.

    Raises:
        BodyTooLarge: over ``limit`` bytes.
    """
    chunks: list[bytes] = []
    size = 0
    while data := await downstream.receive_body():
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"body over the body_transform_limit of {limit} bytes")
        chunks.append(data)
    return b"".join(chunks)


class _BufferedDownstream:
    """A downstream whose request body was read and replaced by ``body``."""

    def __init__(self, downstream: Downstream, body: bytes) -> None:
        self._downstream = downstream
        self._body: bytes | None = body
        self.client_addr = downstream.client_addr
        self.scheme = downstream.scheme

    def request_has_body(self) -> bool:
        return True

    async def receive_body(self) -> bytes:
        body, self._body = self._body, None
        return body or b""

    async def wait_disconnect(self) -> None:
        await self._downstream.wait_disconnect()

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        await self._downstream.send_parts(head, chunks, end)

    def hub_sink(self) -> ClientSink | None:
        return self._downstream.hub_sink()


def _parsed_body(conn: UpstreamConnection, record: ExchangeLog) -> tuple[list[bytes], bool]:
    """The body events already parsed (no I/O): (chunks, whether the message ended)."""
    chunks: list[bytes] = []
    protocol = conn.protocol
    while True:
        event = protocol.next_event()
        if type(event) is Body:
            record.bytes_out += len(event.data)
            chunks.append(event.data)
        elif type(event) is EndOfMessage:
            return chunks, True
        elif event is NEED_DATA:
            return chunks, False
        else:
            raise UpstreamClosed(f"{conn.origin}: unexpected {event!r} in body")
