"""The admin listener: ``/health``, ``/ping`` and ``/status`` on a port of its own.

Off by default (``--admin-port``); it binds to 127.0.0.1 unless ``--admin-host``
says otherwise, because ``/status`` tells the layout of the upstreams.

* ``GET /health`` → 200 with a JSON summary while at least one target can take
  requests, else 503 (for a load balancer or orchestrator in front of us);
* ``GET /ping`` → ``pong`` (the process is alive);
* ``GET /status`` → JSON with every target's health, last and EWMA latency,
  in-flight count, open tunnels, breaker state and counters;
* ``GET /metrics`` → the Prometheus metrics (``trioproxy.observe.metrics``).

One request per connection: admin traffic is rare and tiny.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable
from typing import Protocol

import trio

from trioproxy.engine import Engine
from trioproxy.errors import ProxyError
from trioproxy.http.first_head import read_request_head
from trioproxy.http.h11_impl import H11Server
from trioproxy.http.protocol import RequestHead, ResponseHead
from trioproxy.observe.handlers import metrics_answer

log = logging.getLogger("trioproxy.admin")

_READ_TIMEOUT = 10.0


Answer = tuple[int, bytes, bytes]


class Responder(Protocol):
    """What the admin listener serves: :class:`AdminApp`, or the supervisor's view of
    every worker (``trioproxy.server.supervisor.FleetAdmin``), which answers async."""

    def respond(self, method: bytes, target: bytes) -> Answer | Awaitable[Answer]: ...


class AdminApp:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for a request; sans-I/O."""
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"text/plain; charset=utf-8", b"method not allowed\n"
        now = trio.current_time()
        if path == b"/ping":
            return 200, b"text/plain; charset=utf-8", b"pong\n"
        if path == b"/metrics":
            answer = metrics_answer(self.engine.observer)
            return answer.status, answer.headers[0][1], answer.body
        snapshot = self.engine.snapshot
        groups = snapshot.groups if snapshot is not None else {}
        if path == b"/health":
            # 503 only when no group can take a request: the proxy can serve
            # nothing then (a route to a group that is down answers 503 itself).
            targets = [t for g in groups.values() for t in g.balancer.snapshot(now)]
            healthy = sum(1 for t in targets if t["healthy"] and not t["ejected"])
            ok = any(g.balancer.any_healthy(now) for g in groups.values())
            body = {
                "status": "ok" if ok else "unavailable",
                "healthy": healthy,
                "total": len(targets),
            }
            return (200 if ok else 503), b"application/json", _json(body)
        if path == b"/status":
            status: dict[str, object] = {
                "targets": [t for g in groups.values() for t in g.balancer.snapshot(now)],
                "groups": {name: g.balancer.snapshot(now) for name, g in groups.items()},
            }
            if snapshot is not None:
                status["config"] = {
                    "generation": snapshot.generation,
                    "loaded_at": snapshot.loaded_at,
                    "last_error": self.engine.config_error,
                }
                status["limits"] = snapshot.edge.status()
            return 200, b"application/json", _json(status)
        return 404, b"text/plain; charset=utf-8", b"not found\n"


def _json(value: object) -> bytes:
    return json.dumps(value, indent=2).encode() + b"\n"


async def serve_admin(
    app: Responder,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    addresses = [tuple(listener.socket.getsockname()[:2]) for listener in listeners]
    task_status.started([(str(h), int(p)) for h, p in addresses])

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(app, stream)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, listeners)


async def _serve_one(app: Responder, stream: trio.SocketStream) -> None:
    protocol = H11Server(8192)
    head: RequestHead | None = None
    with trio.move_on_after(_READ_TIMEOUT):
        try:
            head = await read_request_head(stream, protocol, 8192)
            if head is None:
                return
        except ProxyError as exc:
            status, content_type, body = exc.status, b"text/plain", f"{exc.reason}\n".encode()
            head = None
        except (trio.BrokenResourceError, OSError):
            return
        else:
            answer = app.respond(head.method, head.target)
            if inspect.isawaitable(answer):
                answer = await answer
            status, content_type, body = answer
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"connection", b"close"),
        ]
        data = protocol.send_head(ResponseHead(status, headers))
        if head is None or head.method != b"HEAD":
            data += protocol.send_body(body)
        data += protocol.send_end()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError):
            return
