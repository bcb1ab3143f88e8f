"""trioproxy as an ASGI app, and ``proxy_pass`` helpers for Starlette/FastAPI.

- ``app`` / ``create_app(config)``: the whole gateway under
  ``hypercorn --worker-class trio trioproxy.asgi:app`` (see :mod:`.app`);
- ``proxy_pass``, ``proxy_pass_websocket``, ``LoadBalancer``, ``HealthChecker``:
  fastapi-reverse-proxy 0.4.0's API on trioproxy's engine (see :mod:`.helpers`).
"""

from trioproxy.asgi.app import ProxyApp, app, create_app
from trioproxy.asgi.helpers import (
    Proxy,
    ProxyResponse,
    aclose_pool,
    proxy_pass,
    proxy_pass_websocket,
)
from trioproxy.asgi.http import AsgiDownstream, ResponseAborted
from trioproxy.asgi.websocket import AsgiWebSocket
from trioproxy.balance.library import HealthChecker, LoadBalancer

__all__ = [
    "AsgiDownstream",
    "AsgiWebSocket",
    "HealthChecker",
    "LoadBalancer",
    "Proxy",
    "ProxyApp",
    "ProxyResponse",
    "ResponseAborted",
    "aclose_pool",
    "app",
    "create_app",
    "proxy_pass",
    "proxy_pass_websocket",
]
