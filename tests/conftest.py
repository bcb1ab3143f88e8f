"""Shared fixtures. The helpers behind them live in ``fixtures.py``; import those directly
(``from fixtures import run_proxy, raw_request, serve_tcp_handler``) where a test needs
more than a fixture gives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import upstream_app
from fixtures import serve_asgi


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> str:
    """Base URL (``http://127.0.0.1:PORT``) of ``upstream_app.app`` served by hypercorn."""
    return await serve_asgi(upstream_app.app, nursery)


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` with a 10 s timeout that ignores proxy environment variables."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client
