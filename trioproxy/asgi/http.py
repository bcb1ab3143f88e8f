"""HTTP over ASGI: the request head from a scope, and the engine's downstream.

:class:`AsgiDownstream` is the engine's :class:`~trioproxy.engine.Downstream`
over ASGI's ``receive`` and ``send``. It holds no proxy logic: the engine picks,
retries, transforms and relays; this only turns messages into body chunks and
response parts into messages.

Full duplex. The engine reads the request body (``receive_body``) in one task
while the response streams back in another, and after the body it watches for
``http.disconnect`` (``wait_disconnect``): a client that leaves cancels the
upstream exchange, whose connection is then closed, not pooled. Starlette's
``StreamingResponse`` is not used: it drops request body messages while it
streams, so a proxy built on it cannot relay an upload and a download at once.

Backpressure comes from the server: hypercorn hands request body messages
through a bounded queue (it stops reading the socket when the app does not
take them) and its ``send`` returns once the data is written.

The request-target goes upstream as the client sent it: ``raw_path``, then
``?`` and ``query_string`` when there is one (ASGI cannot tell ``/a?`` from
``/a``). Header fields keep their order and repetitions; an HTTP/2 or HTTP/3
client's ``cookie`` fields, which RFC 9113 §8.2.3 lets it split, are joined
with ``"; "`` for the HTTP/1.1 upstream.
"""

from __future__ import annotations

import logging
import time

import trio

from trioproxy.engine import Engine, ExchangeLog
from trioproxy.errors import (
    BodyTooLarge,
    ClientDisconnected,
    MethodNotAllowed,
    ProxyError,
    UpstreamBrokenMidBody,
)
from trioproxy.front import declared_length_error
from trioproxy.http.answers import Answer, error_answer, framed
from trioproxy.http.protocol import Headers, RequestHead, ResponseHead
from trioproxy.observe.access import log_exchange
from trioproxy.relay_hub import ClientSink
from trioproxy.snapshot import Route

from .types import Message, Receive, Scope, Send

log = logging.getLogger("trioproxy.asgi")

_SEND_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ResponseAborted(Exception):
    """Raised out of the ASGI app to make the server cut the client's connection
    (HTTP/1.1) or reset its stream (HTTP/2): the upstream broke off a response
    whose head was sent, and a truncated body must not pass for a whole one."""


def client_addr(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def scope_headers(scope: Scope) -> Headers:
    """The scope's header fields as the engine takes them: names lowercased, in
    order, repeated fields kept; split ``cookie`` fields of an HTTP/2 or HTTP/3
    request joined with ``"; "`` (RFC 9113 §8.2.3, RFC 9114 §4.2.1)."""
    headers: Headers = [(bytes(name).lower(), bytes(value)) for name, value in scope["headers"]]
    if scope.get("http_version", "1.1") in ("1.0", "1.1"):
        return headers
    cookies = [value for name, value in headers if name == b"cookie"]
    if len(cookies) < 2:
        return headers
    joined: Headers = []
    for name, value in headers:
        if name != b"cookie":
            joined.append((name, value))
        elif cookies:
            joined.append((b"cookie", b"; ".join(cookies)))
            cookies = []
    return joined


def scope_target(scope: Scope) -> bytes:
    """``raw_path`` and the query string, byte for byte."""
    raw_path = scope.get("raw_path")
    if raw_path is None:
        raw_path = scope["path"].encode("utf-8")
    query = scope.get("query_string", b"")
    return bytes(raw_path) + b"?" + bytes(query) if query else bytes(raw_path)


def request_head(scope: Scope) -> RequestHead:
    """The request head of an ``http`` or ``websocket`` scope."""
    return RequestHead(
        method=scope.get("method", "GET").encode("ascii"),
        target=scope_target(scope),
        headers=scope_headers(scope),
        http_version=scope.get("http_version", "1.1").encode("ascii"),
    )


def declares_body(head: RequestHead) -> bool | None:
    """Whether the head says a body follows; None when only the messages can tell
    (an HTTP/2 or HTTP/3 request without ``Content-Length``)."""
    for name, value in head.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
        if name == b"content-length":
            return False
    return False if head.http_version in (b"1.0", b"1.1") else None


class AsgiDownstream:
    """One HTTP exchange's client side over ASGI (the engine's ``Downstream``)."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        body_limit: int | None = None,
    ) -> None:
        self.client_addr = client_addr(scope)
        self.scheme = str(scope.get("scheme", "http"))
        self._http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
        self._receive = receive
        self._send = send
        #: The route's ``max_body_size`` (None: no limit).
        self.body_limit = body_limit
        self._has_body = True
        self._peeked: Message | None = None
        self._done = False
        self._ending = False
        self._received = 0
        #: The response head went to the client (an error can no longer be answered).
        self.started = False

    @property
    def received(self) -> int:
        """Request body bytes received so far."""
        return self._received

    async def read_framing(self, head: RequestHead) -> None:
        """Learn whether the request has a body, reading its first message if the
        head cannot say (HTTP/2 without ``Content-Length``); checks a declared
        length against the limit.

        Raises:
            BodyTooLarge, ClientDisconnected.
        """
        if (too_large := declared_length_error(head, self.body_limit)) is not None:
            raise too_large
        declared = self.note_framing(head)
        if declared is None:
            message = self._peeked = await self._receive()
            declared = message["type"] != "http.request" or bool(
                message.get("body") or message.get("more_body")
            )
        self._has_body = declared

    def note_framing(self, head: RequestHead) -> bool | None:
        """Take what the head says of a body, without reading (see
        :func:`declares_body`), so that an answer made before the body is read
        closes an HTTP/1.1 connection only when a body is really left unread."""
        declared = declares_body(head)
        if declared is not None:
            self._has_body = declared
        return declared

    # --- Downstream -------------------------------------------------------------------

    def request_has_body(self) -> bool:
        return self._has_body

    async def receive_body(self) -> bytes:
        if self._done:
            return b""
        while True:
            message = self._peeked
            if message is None:
                message = await self._receive()
            else:
                self._peeked = None
            kind = message["type"]
            if kind == "http.request":
                data = bytes(message.get("body", b""))
                if not message.get("more_body", False):
                    self._done = True
                if data:
                    self._received += len(data)
                    limit = self.body_limit
                    if limit is not None and self._received > limit:
                        raise BodyTooLarge(f"body over {limit} bytes")
                    return data
                if self._done:
                    return b""
            elif kind == "http.disconnect":
                raise ClientDisconnected("http.disconnect in the request body")

    async def wait_disconnect(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                if self._ending:
                    # The response's last message is being sent: a client that
                    # closes now had all of it (the server drops what it cannot
                    # send, so that send returns). Not an abort.
                    await trio.sleep_forever()
                raise ClientDisconnected("http.disconnect while the response was sent")

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        try:
            if head is not None:
                self.started = True
                await self._send(
                    {
                        "type": "http.response.start",
                        "status": head.status_code,
                        "headers": head.headers,
                    }
                )
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if body or end:
                self._ending = end
                await self._send({"type": "http.response.body", "body": body, "more_body": not end})
        except _SEND_ERRORS as exc:
            raise ClientDisconnected(repr(exc)) from None

    def hub_sink(self) -> ClientSink | None:
        return None  # the server owns the client socket

    # --- the front end's own answers ----------------------------------------------------

    async def answer(self, answer: Answer) -> None:
        """A whole response made by the proxy (an error, a ``respond`` route, a CORS
        preflight), framed as the standalone server frames it: an HTTP/1.1 request
        whose body was not read to its end (a 413, an upstream that failed mid-upload)
        gets ``Connection: close``, so the server ends the connection instead of
        reading the rest as the next request's (HTTP/2 ends only the stream)."""
        close = self._http1 and self._has_body and not self._done
        head = ResponseHead(answer.status, framed(answer, close=close), answer.reason)
        await self.send_parts(head, [answer.body], True)


async def relay_exchange(
    engine: Engine,
    head: RequestHead,
    route: Route,
    downstream: AsgiDownstream,
    record: ExchangeLog,
) -> str:
    """``engine.handle`` with the failures answered as the standalone server
    answers them; returns the access log's note.

    Raises:
        ResponseAborted: the upstream broke off after the response head was sent.
    """
    group = route.group
    assert group is not None
    # Counted, so that a group a reload removed closes its connections only once
    # its last exchange has ended.
    group.enter()
    try:
        return await relay(engine, head, route, downstream, record)
    finally:
        group.leave()


async def relay(
    engine: Engine,
    head: RequestHead,
    route: Route,
    downstream: AsgiDownstream,
    record: ExchangeLog,
) -> str:
    """:func:`relay_exchange` for a caller that counts the group open itself (the
    app does, through ``trioproxy.front``).

    Raises:
        ResponseAborted: the upstream broke off after the response head was sent.
    """
    try:
        await downstream.read_framing(head)
        await engine.handle(head, route, downstream, record)
    except ClientDisconnected:
        record.status = record.status or 499
        return "client gone"
    except UpstreamBrokenMidBody as exc:
        log.warning("aborting response to %s: %s", downstream.client_addr, exc.detail)
        raise ResponseAborted(exc.detail) from None
    except ProxyError as exc:
        record.status = exc.status
        if downstream.started:
            raise ResponseAborted(exc.detail) from None
        await answer_error(downstream, exc, record)
        return exc.detail
    return ""


async def answer_error(downstream: AsgiDownstream, exc: ProxyError, record: ExchangeLog) -> None:
    """The standalone server's error answer (status, one-line text, ``Retry-After``...)."""
    record.status = exc.status
    try:
        await downstream.answer(error_answer(exc, request_id=record.request_id))
    except ClientDisconnected:
        pass


def refuse_connect(head: RequestHead) -> ProxyError | None:
    """``CONNECT`` asks for a tunnel, which a reverse proxy does not open (405)."""
    return MethodNotAllowed("CONNECT") if head.method == b"CONNECT" else None


def access(
    downstream_addr: str, head: RequestHead, record: ExchangeLog, started: float, note: str
) -> None:
    log_exchange(downstream_addr, head, record, time.perf_counter() - started, note)
