"""fastapi-reverse-proxy, set up as its README's Quick Start shows.

The ``Proxy(app)`` lifespan puts one shared ``httpx.AsyncClient`` in ``app.state`` and
``proxy_pass`` uses it; a catch-all route forwards every method, and a WebSocket route
forwards upgrades with ``proxy_pass_websocket``. Run by the peers' virtualenv:

    uvicorn fastapi_app:app --app-dir bench/peers   (BENCH_UPSTREAM=http://HOST:PORT)
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi_reverse_proxy import Proxy, proxy_pass, proxy_pass_websocket

UPSTREAM = os.environ["BENCH_UPSTREAM"]


@asynccontextmanager
async def lifespan(app: FastAPI):
    async with Proxy(app):
        yield


app = FastAPI(lifespan=lifespan)


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
async def index(req: Request):
    return await proxy_pass(req, UPSTREAM)


@app.websocket("/{path:path}")
async def websocket(ws: WebSocket):
    await proxy_pass_websocket(ws, UPSTREAM.replace("http://", "ws://", 1))
