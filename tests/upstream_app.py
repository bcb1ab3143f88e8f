"""The upstream that end-to-end tests put behind the proxy.

A hand-written ASGI 3 application, served by hypercorn's trio worker (see
``fixtures.serve_asgi``). It has no framework in it on purpose: what it receives is what
the proxy sent, with nothing normalised on the way, so a test can check exactly what
crossed the proxy.

Endpoints (any method unless stated):

``/echo...``        JSON ``{"method", "target", "headers", "body_sha256", "body_len"}``;
                    ``target`` is ``raw_path`` plus ``?query_string`` as received (ASGI
                    cannot tell ``/echo?`` from ``/echo``), ``headers`` the received pairs
                    in order, decoded latin-1.
``/bytes/{n}``      ``pattern_bytes(n)`` in 64 KiB chunks with ``Content-Length``;
                    ``?chunked=1`` leaves the length out, so the server sends it chunked.
``/upload``         POST/PUT; hashes the body as it streams in, answers ``{"len", "sha256"}``.
``/sse``            ``?n=N&interval=S``: N server-sent events, one ASGI body message each,
                    ``id: i`` and ``data: {"i": i, "t": time.time()}``, S seconds apart;
                    a ``Last-Event-ID`` request header is echoed in the first event's data
                    as ``"last_event_id"``.
``/slow``           ``?delay=S``: sleeps S seconds, then 200 ``slow done``.
``/status/{code}``  that status, body ``status {code}`` (none for 204 and 304).
``/cookies``        three separate ``set-cookie`` headers and ``cache-control: no-cache, private``.
``/ws``             WebSocket echo of text and binary messages.
``/ws/headers``     WebSocket: sends the handshake's header fields as JSON ``[[name, value]]``.
``/``               200 ``ok``. Anything else is 404.

Sleeping uses trio, so serve it with a trio server.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK_SIZE = 64 * 1024
_PATTERN_UNIT = bytes(range(256))
# CHUNK_SIZE is a multiple of 256, so every full chunk of the pattern is this same block
# and a stream of chunks is the pattern itself.
_PATTERN_CHUNK = _PATTERN_UNIT * (CHUNK_SIZE // len(_PATTERN_UNIT))


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of ``bytes(range(256))`` repeated: what ``/bytes/{n}`` sends."""
    whole, rest = divmod(n, len(_PATTERN_UNIT))
    return _PATTERN_UNIT * whole + _PATTERN_UNIT[:rest]


def pattern_sha256(n: int) -> str:
    """Hex SHA-256 of ``pattern_bytes(n)``, computed chunk by chunk."""
    digest = hashlib.sha256()
    remaining = n
    while remaining:
        size = min(remaining, CHUNK_SIZE)
        digest.update(_PATTERN_CHUNK[:size])
        remaining -= size
    return digest.hexdigest()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI 3 entry point."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "websocket":
        await websocket_echo(scope, receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)
    else:
        raise RuntimeError(f"unsupported ASGI scope type {scope['type']!r}")


async def websocket_echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Accept a WebSocket on ``/ws`` and send every text or binary message back."""
    if scope["path"] == "/ws/headers":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        fields = [
            [bytes(n).decode("latin-1"), bytes(v).decode("latin-1")] for n, v in scope["headers"]
        ]
        await send({"type": "websocket.send", "text": json.dumps(fields)})
        await receive()  # websocket.disconnect
        return
    if scope["path"] != "/ws":
        # Closing before accepting makes the server answer the handshake with 403.
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif message["type"] == "websocket.disconnect":
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    path: str = scope["path"]
    query = {key: values[-1] for key, values in parse_qs(scope["query_string"].decode()).items()}
    method: str = scope["method"]

    if path.startswith("/echo"):
        await _echo(scope, receive, send)
    elif path.startswith("/bytes/") and path[len("/bytes/") :].isdigit():
        await _bytes(int(path[len("/bytes/") :]), query.get("chunked") == "1", send)
    elif path == "/upload" and method in ("POST", "PUT"):
        await _upload(receive, send)
    elif path == "/sse":
        last_event_id = _header(scope, b"last-event-id")
        await _sse(int(query.get("n", "3")), float(query.get("interval", "0")), last_event_id, send)
    elif path == "/slow":
        await trio.sleep(float(query.get("delay", "1")))
        await _respond(send, 200, b"slow done")
    elif path.startswith("/status/") and path[len("/status/") :].isdigit():
        code = int(path[len("/status/") :])
        body = b"" if code in (204, 304) else f"status {code}".encode()
        await _respond(send, code, body)
    elif path == "/cookies":
        headers = [
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"set-cookie", b"c=3"),
            (b"cache-control", b"no-cache, private"),
        ]
        await _respond(send, 200, b"cookies", headers)
    elif path == "/":
        await _respond(send, 200, b"ok")
    else:
        await _respond(send, 404, b"not found")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [(b"content-type", b"text/plain; charset=utf-8")] if body else []
    all_headers += headers or []
    if status not in (204, 304):
        all_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, payload: object) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> tuple[int, str]:
    """Consume the request body as it arrives; return its length and hex SHA-256."""
    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        digest.update(chunk)
        length += len(chunk)
        if not message.get("more_body", False):
            break
    return length, digest.hexdigest()


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    length, sha256 = await _read_body(receive)
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query_string: bytes = scope["query_string"]
    target = raw_path + (b"?" + query_string if query_string else b"")
    await _respond_json(
        send,
        {
            "method": scope["method"],
            "target": target.decode("latin-1"),
            "headers": [
                [bytes(k).decode("latin-1"), bytes(v).decode("latin-1")]
                for k, v in scope["headers"]
            ],
            "body_sha256": sha256,
            "body_len": length,
        },
    )


async def _bytes(n: int, chunked: bool, send: Send) -> None:
    headers = [(b"content-type", b"application/octet-stream")]
    if not chunked:
        headers.append((b"content-length", str(n).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    remaining = n
    while remaining > CHUNK_SIZE:
        await send({"type": "http.response.body", "body": _PATTERN_CHUNK, "more_body": True})
        remaining -= CHUNK_SIZE
    await send({"type": "http.response.body", "body": _PATTERN_CHUNK[:remaining]})


async def _upload(receive: Receive, send: Send) -> None:
    length, sha256 = await _read_body(receive)
    await _respond_json(send, {"len": length, "sha256": sha256})


async def _sse(n: int, interval: float, last_event_id: str | None, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    for i in range(n):
        if i:
            await trio.sleep(interval)
        data: dict[str, object] = {"i": i, "t": time.time()}
        if i == 0 and last_event_id is not None:
            data["last_event_id"] = last_event_id
        event = f"id: {i}\ndata: {json.dumps(data)}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
