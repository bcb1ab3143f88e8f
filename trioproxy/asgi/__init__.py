"""trioproxy as an ASGI app, and ``proxy_pass`` helpers for Starlette/FastAPI.

- ``app`` / ``create_app(config)``: the whole gateway under
  ``hypercorn --worker-class trio trioproxy.asgi:app`` (see :mod:`.app`).
"""

from trioproxy.asgi.app import ProxyApp, app, create_app
from trioproxy.asgi.http import AsgiDownstream, ResponseAborted
from trioproxy.asgi.websocket import AsgiWebSocket

__all__ = [
    "AsgiDownstream",
    "AsgiWebSocket",
    "ProxyApp",
    "ResponseAborted",
    "app",
    "create_app",
]
