"""A FastAPI gateway on trioproxy's engine: proxy_pass behind a health-checked balancer.

Run it (trio is required: the helpers are trio code)::

    GATEWAY_UPSTREAMS=http://127.0.0.1:9001,http://127.0.0.1:9002 \\
        hypercorn --worker-class trio examples/fastapi_gateway.py:app

What it serves:

* ``/api/...``: to the fastest healthy upstream (``LoadBalancer(HealthChecker(...))``),
  path and query as the client sent them; a request to an upstream that died since
  the last ping goes to the other one (connect refused is retried there);
* ``/events``: the upstreams' ``/sse`` stream, event by event;
* ``/ws``: a WebSocket to an upstream's ``/ws``, subprotocol chosen by the upstream;
* ``/first/...``: always to the first upstream, with an extra header
  (``proxy_pass(request, url, ...)`` without a balancer).

This is fastapi-reverse-proxy's API: code written for it changes only its import.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response, WebSocket

from trioproxy.asgi import HealthChecker, LoadBalancer, proxy_pass

UPSTREAMS = [
    url.strip()
    for url in os.environ.get("GATEWAY_UPSTREAMS", "http://127.0.0.1:9001").split(",")
    if url.strip()
]
#: Seconds between two pings of each upstream.
PING_INTERVAL = float(os.environ.get("GATEWAY_PING_INTERVAL", "1"))

checker = HealthChecker(UPSTREAMS, interval=PING_INTERVAL, timeout=2)
balancer = LoadBalancer(checker)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with checker:  # pings every upstream once, then every PING_INTERVAL
        yield


app = FastAPI(lifespan=lifespan)


@app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def api(request: Request, rest: str) -> Response:
    return await balancer.proxy_pass(request, path="/" + rest)


@app.get("/events")
async def events(request: Request) -> Response:
    return await balancer.proxy_pass(request, path="/sse", timeout=300)


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await balancer.proxy_pass_websocket(websocket, path="/ws")


@app.api_route("/first/{rest:path}", methods=["GET", "POST"])
async def first(request: Request, rest: str) -> Response:
    return await proxy_pass(
        request, UPSTREAMS[0], path="/" + rest, additional_headers={"X-Gateway": "fastapi"}
    )
