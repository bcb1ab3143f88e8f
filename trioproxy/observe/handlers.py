"""What ``handler = "..."`` routes answer, made by the proxy itself (sans-I/O).

* ``metrics``: the engine's Prometheus metrics (404 when they are off);
* ``health``: the AI-service proxy's ``/api/health``, for the upstream group the
  route names: ``status``, ``target_url`` (its first server), ``timeout`` (its
  read timeout, seconds), ``ssl_verify``, and each server's health; 200 while a
  server can take requests, else 503;
* ``ping``: ``pong``.

The server's and the route's response header rules apply to these answers as to
an upstream's (``X-Proxy-By``, ``X-Request-ID``, ``X-Process-Time``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from trioproxy.http.answers import TEXT, Answer
from trioproxy.http.headers import get_first
from trioproxy.http.protocol import RequestHead
from trioproxy.http.transforms import format_process_time
from trioproxy.observe.fleet import worker_exposition
from trioproxy.observe.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from trioproxy.observe.observer import Observer
    from trioproxy.snapshot import Route

JSON = b"application/json"


def metrics_answer(observer: Observer | None, *, fleet: bool = False) -> Answer:
    """The engine's metrics; with ``fleet`` (the proxy's own port), in a worker,
    every worker's counters summed (``trioproxy.observe.fleet.worker_exposition``)."""
    if observer is None:
        return Answer(404, [(b"content-type", TEXT)], b"metrics are off (server.metrics)\n")
    body = observer.metrics.exposition()
    if fleet and (whole := worker_exposition(body)) is not None:
        body = whole
    return Answer(200, [(b"content-type", CONTENT_TYPE)], body)


def health_answer(route: Route, now: float) -> Answer:
    group = route.group
    assert group is not None, "a health route names its upstream"
    settings = group.settings
    balancer = group.balancer
    servers = balancer.snapshot(now)
    ok = balancer.any_healthy(now)
    body = {
        "status": "healthy" if ok else "unhealthy",
        "target_url": servers[0]["url"] if servers else None,
        "timeout": route.read_timeout,
        "ssl_verify": settings.tls.verify,
        "upstream": group.name,
        "servers": [
            {
                "url": s["url"],
                "healthy": s["healthy"] and not s["ejected"],
                "breaker": s["breaker"],
                "inflight": s["inflight"],
            }
            for s in servers
        ],
    }
    return Answer(200 if ok else 503, [(b"content-type", JSON)], json.dumps(body).encode())


def handler_answer(
    head: RequestHead,
    route: Route,
    *,
    observer: Observer | None,
    now: float,
    client_addr: str,
    request_id: bytes,
    process_time: float,
) -> Answer:
    """The answer of ``route``'s handler, with the response header rules applied."""
    handler = route.settings.handler
    if handler == "metrics":
        answer = metrics_answer(observer, fleet=True)
    elif handler == "health":
        answer = health_answer(route, now)
    else:
        answer = Answer(200, [(b"content-type", TEXT)], b"pong\n")
    headers = [*answer.headers, (b"x-request-id", request_id)]
    values = route.template_values(head, client_addr, request_id)
    if values is not None:
        values.process_time = format_process_time(process_time)
    headers = route.response_headers(headers, values, get_first(head.headers, b"origin"))
    return Answer(answer.status, headers, answer.body)
