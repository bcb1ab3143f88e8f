"""A FastAPI app whose endpoints fail on purpose, for test_asgi's failure cases.

``PROXY_PASS_DEAD``: a URL nothing listens on; ``PROXY_PASS_SLOW``: upstream_app
(whose ``/slow`` sleeps).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response, WebSocket

from trioproxy.asgi import HealthChecker, LoadBalancer, proxy_pass, proxy_pass_websocket

DEAD = os.environ["PROXY_PASS_DEAD"]
SLOW = os.environ["PROXY_PASS_SLOW"]
checker = HealthChecker([DEAD], interval=1, timeout=1)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with checker:
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/refused")
async def refused(request: Request) -> Response:
    return await proxy_pass(request, DEAD)


@app.get("/timeout")
async def timeout(request: Request) -> Response:
    return await proxy_pass(request, SLOW, path="/slow?delay=5", forward_query=False, timeout=0.5)


@app.get("/no-healthy")
async def no_healthy(request: Request) -> Response:
    return await LoadBalancer(checker).proxy_pass(request, path="/")


@app.websocket("/ws-refused")
async def ws_refused(websocket: WebSocket) -> None:
    await proxy_pass_websocket(websocket, DEAD)


@app.websocket("/ws-no-healthy")
async def ws_no_healthy(websocket: WebSocket) -> None:
    await LoadBalancer(checker).proxy_pass_websocket(websocket)
