"""The LLM stream meter on one exchange: where the engine's relays meet the parser.

:class:`LlmMeter` wraps the exchange's downstream (the front end's body source
and response sink). Every path a response takes goes through it: the engine's
one-write fast path and its per-task relay call ``send_parts``, and the stream
hub hands each write's chunks to the ``meter`` of the sink ``hub_sink`` gives it
(the SSE parser's own ``relay``, with the hub's time) before it frames them. So
the meter is written once, and sees each chunk as it is handed to the client,
with no copy kept and no byte delayed (bar the one case described in
:mod:`trioproxy.observe.llm`: hiding a usage chunk the client did not ask for).

The request: with ``include_usage = "pass"`` its body is read as it goes
upstream (up to ``MAX_JSON`` kept, for ``model`` and ``stream``). With
``"inject"`` the body is read first (up to ``MAX_JSON``; a larger one goes as
it is), ``stream_options.include_usage`` added to a streamed request that
lacks it, and ``Content-Length`` set to the new size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from trioproxy.http.headers import get_first
from trioproxy.http.protocol import RequestHead, ResponseHead
from trioproxy.observe.llm import (
    MAX_JSON,
    JsonMeter,
    RequestFields,
    SseMeter,
    inject_include_usage,
    request_fields,
)
from trioproxy.relay_hub import ClientSink

if TYPE_CHECKING:
    from trioproxy.engine import Downstream

log = logging.getLogger("trioproxy.llm")


class LlmMeter:
    """One metered LLM exchange: a :class:`~trioproxy.engine.Downstream` around the
    front end's, and what it read (see the module docstring)."""

    def __init__(
        self,
        endpoint: str,
        *,
        inject: bool,
        models: tuple[str, ...],
        now: Callable[[], float],
    ) -> None:
        #: The OpenAI endpoint path (the seed families' ``endpoint`` label).
        self.endpoint = endpoint
        self.models = models
        self._inject = inject
        self._now = now
        self._inner: Downstream | None = None
        #: Request body chunks read ahead (``inject``), given out first.
        self._prefix: list[bytes] = []
        #: The whole request body is in ``_prefix``.
        self._done = False
        self._request_chunks: list[bytes] = []
        self._request_size = 0
        self._fields: RequestFields | None = None
        #: The usage chunk was asked for by the proxy, not the client: it is hidden.
        self.injected = False
        self.sse: SseMeter | None = None
        self.json: JsonMeter | None = None
        self.client_addr = ""
        self.scheme = "http"
        #: The response head went through ``send_parts`` (the parser is chosen).
        self._replied = False

    # --- the request ----------------------------------------------------------------

    async def attach(
        self, request: RequestHead, downstream: Downstream
    ) -> tuple[RequestHead, Downstream]:
        """Wrap ``downstream``; with ``inject``, read the body first and perhaps
        rewrite it. Returns the request head and downstream to relay with."""
        self._inner = downstream
        self.client_addr = downstream.client_addr
        self.scheme = downstream.scheme
        if not self._inject or not downstream.request_has_body():
            return request, self
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_JSON and (data := await downstream.receive_body()):
            chunks.append(data)
            size += len(data)
        self._request_chunks = chunks
        self._request_size = size
        if size > MAX_JSON:
            self._prefix = chunks  # replayed, then the rest: sent as it is
            return request, self
        body = b"".join(chunks)
        self._fields = request_fields(body)
        changed = inject_include_usage(body)
        if changed is not None:
            self.injected = True
            body = changed
        headers = [
            (n, v) for n, v in request.headers if n not in (b"content-length", b"transfer-encoding")
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        self._prefix = [body]
        self._done = True
        request = RequestHead(request.method, request.target, headers, request.http_version)
        return request, self

    @property
    def fields(self) -> RequestFields:
        """What the request asked for (read once, when first needed)."""
        if self._fields is None:
            self._fields = (
                request_fields(b"".join(self._request_chunks))
                if self._request_size <= MAX_JSON
                else RequestFields()
            )
            self._request_chunks = []
        return self._fields

    # --- Downstream -----------------------------------------------------------------

    def request_has_body(self) -> bool:
        assert self._inner is not None
        return bool(self._prefix) or self._inner.request_has_body()

    async def receive_body(self) -> bytes:
        if self._prefix:
            data = self._prefix[0]
            self._prefix = self._prefix[1:]
            return data
        if self._done:
            return b""
        assert self._inner is not None
        data = await self._inner.receive_body()
        if data and self._fields is None:
            self._request_size += len(data)
            if self._request_size <= MAX_JSON:
                self._request_chunks.append(data)
            else:
                self._request_chunks = []
        return data

    async def wait_disconnect(self) -> None:
        assert self._inner is not None
        await self._inner.wait_disconnect()

    async def send_parts(self, head: ResponseHead | None, chunks: list[bytes], end: bool) -> None:
        assert self._inner is not None
        if head is not None:
            head = self.response_head(head)
            self._replied = True
        await self._inner.send_parts(head, self.body(chunks, end), end)

    def hub_sink(self) -> ClientSink | None:
        """The front end's sink for the stream hub, with the meter's reader on it.

        Asked for after the response head went through :meth:`send_parts`, so the
        reader is known: the hub calls the SSE parser itself, with its own time (no
        layer of ours and no clock read per event).
        """
        assert self._inner is not None
        assert self._replied, "the hub's sink is asked for after the response head"
        sink = self._inner.hub_sink()
        if sink is None:
            return None
        assert sink.meter is None, "one meter per sink"
        if self.sse is not None:
            meter = self.sse.relay
        elif self.json is not None:
            meter = self._read_json
        else:
            return sink  # no reply to read (an error answer)
        return ClientSink(sink.sock, sink.frame, sink.failed, meter)

    # --- the response, as it passes ----------------------------------------------------

    def response_head(self, head: ResponseHead) -> ResponseHead:
        content_type = get_first(head.headers, b"content-type") or b""
        if content_type.startswith(b"text/event-stream"):
            hide = self.injected and not self.fields.include_usage
            self.sse = SseMeter(hide_usage=hide)
            if hide and get_first(head.headers, b"content-length") is not None:
                # Bytes will be cut out: let the client framing carry the length.
                headers = [(n, v) for n, v in head.headers if n != b"content-length"]
                return ResponseHead(head.status_code, headers, head.reason, head.http_version)
        elif head.status_code < 300:
            self.json = JsonMeter()
        return head

    def body(self, chunks: list[bytes], end: bool) -> list[bytes]:
        """The chunks to send for ``chunks`` (the same list unless a usage chunk is
        hidden); each is read on the way."""
        if self.sse is not None:
            return self.sse.relay(chunks, end, self._now())
        if self.json is not None:
            return self._read_json(chunks, end, 0.0)
        return chunks

    def _read_json(self, chunks: list[bytes], end: bool, now: float) -> list[bytes]:
        assert self.json is not None
        for chunk in chunks:
            self.json.feed(chunk)
        if end:
            self.json.end()
        return chunks
