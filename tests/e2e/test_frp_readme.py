"""fastapi-reverse-proxy 0.4.0's README Quick Start, with only its import changed,
runs under hypercorn's trio worker in front of a real upstream.

The example is kept here as its README prints it; the test swaps the import line
(and the README's fixed upstream address for the test upstream's) and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
from fixtures import hypercorn_command, run_listening_process

README_QUICK_START = '''
from fastapi import FastAPI, Request, WebSocket
from contextlib import asynccontextmanager

from fastapi_reverse_proxy import Proxy, proxy_pass, proxy_pass_websocket

@asynccontextmanager
async def lifespan(app: FastAPI):
    async with Proxy(app):
        yield

app = FastAPI(lifespan=lifespan)

# catch-all route. recommended for a reverse proxy
@app.api_route("/{path:path}", methods=["GET","POST","PUT","DELETE"]) # don't forget to add the methods.
async def index(req: Request):
    """
    You always need to pass the "Request" object and to specify the host
    If you don't add a path, it will be the same as the original (/login --> http://127.0.0.1/login)
    """
    return await proxy_pass(req, "http://127.0.0.1:8080")
'''  # noqa: E501  (the README's own line)


async def test_readme_quick_start_runs_with_only_the_import_changed(
    upstream: str, tmp_path: Path
) -> None:
    source = README_QUICK_START.replace(
        "from fastapi_reverse_proxy import", "from trioproxy.asgi import"
    ).replace("http://127.0.0.1:8080", upstream)
    assert source.count("\n") == README_QUICK_START.count("\n")
    (tmp_path / "readme_app.py").write_text(source)
    command = hypercorn_command("readme_app:app")
    with trio.fail_after(30):
        async with (
            run_listening_process(command, cwd=tmp_path) as app,
            httpx.AsyncClient(base_url=app.url, timeout=10) as client,
        ):
            echo = (await client.get("/echo/login?next=%2F")).json()
            upload = await client.post("/upload", content=b"x" * 100_000)
            cookies = await client.get("/cookies")
    assert echo["target"] == "/echo/login?next=%2F"
    assert upload.json()["len"] == 100_000
    assert cookies.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]
