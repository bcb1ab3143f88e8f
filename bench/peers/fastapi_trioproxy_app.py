"""The fastapi-reverse-proxy app of ``fastapi_app.py`` with only its import changed:
``proxy_pass`` from ``trioproxy.asgi``, on hypercorn's trio worker. Run by the
project's own Python (trioproxy and FastAPI are installed there, not in the peers'
virtualenv):

    hypercorn --worker-class trio fastapi_trioproxy_app:app   (BENCH_UPSTREAM=http://HOST:PORT)
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket

from trioproxy.asgi import Proxy, proxy_pass, proxy_pass_websocket

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
