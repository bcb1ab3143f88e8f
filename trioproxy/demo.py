"""Two small demo upstreams, served in-process by hypercorn, for ``--demo``.

They exist so that the first README command shows a working proxy with
nothing else installed: ``/`` names the demo upstream that answered (reload to
see round-robin at work) and shows the forwarding headers the proxy added,
``/events`` streams a few Server-Sent Events, ``/api`` answers JSON.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_SHOWN_HEADERS = (
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "x-request-id",
)


def demo_app(name: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app that says which demo upstream it is."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if path == "/api":
            body = json.dumps({"upstream": name, "path": path, "headers": headers}).encode()
            await _respond(send, 200, "application/json", body)
        elif path == "/events":
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
            for i in range(1, 6):
                event = f"id: {i}\ndata: tick {i} from demo upstream {name}\n\n"
                await send(
                    {"type": "http.response.body", "body": event.encode(), "more_body": True}
                )
                await trio.sleep(0.5)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/":
            rows = "".join(
                f"<tr><td>{h}</td><td>{html.escape(headers.get(h, '-'))}</td></tr>"
                for h in _SHOWN_HEADERS
            )
            page = (
                "<!doctype html><meta charset=utf-8><title>trioproxy demo</title>"
                f"<h1>Hello from demo upstream {name}</h1>"
                "<p>This page was served through trioproxy. Reload: the next request goes "
                "to the other demo upstream (round-robin).</p>"
                f"<table>{rows}</table>"
                '<p>Also try <a href="/api">/api</a> and <a href="/events">/events</a> (SSE).</p>'
            )
            await _respond(send, 200, "text/html; charset=utf-8", page.encode())
        else:
            await _respond(send, 404, "text/plain", b"not found\n")

    return app


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def run_demo_upstreams(
    nursery: trio.Nursery, names: tuple[str, ...] = ("A", "B")
) -> list[str]:
    """Start the demo upstreams in ``nursery``; their base URLs."""
    urls = []
    for name in names:
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        binds: list[str] = await nursery.start(serve, demo_app(name), config)
        urls.append(binds[0])
    return urls
