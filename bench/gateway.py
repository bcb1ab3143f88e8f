"""The 50-route config of the ``trioproxy-50routes`` contender, written at run time.

Issue 13's target: a gateway config of 50 routes (hosts, prefixes, a few regexes, header
transforms on the matched route) keeps small-GET req/s at >= 90 % of the single-route
proxy's. :func:`write_config` writes it into the measurement's own directory, with every
route's group pointing at the scenario's back end.

The route the load hits, ``shop``, is reached at :data:`MOUNT` + the scenario's path
(``/shop/small``) and costs what a real gateway route costs:

* it is far down its candidate list: the request's ``Host`` (``127.0.0.1:PORT``) is
  looked up among the 10 exact hosts and, dot by dot, the 5 wildcards, and misses;
  then the no-host list is walked past the 2 routes with a higher priority, the 3 exact
  paths, the 21 longer prefixes and two ``/shop`` routes with more conditions (a header
  that is absent, methods that do not include GET), 28 candidates before it. The 5
  regexes and the catch-all come after it (the router settles that order when it is
  built, as nginx tries prefixes before regexes), so they cost this request nothing;
* it has conditions of its own (``methods``);
* it rewrites the path, ``strip_prefix = "/shop"``, ``add_prefix = "/v1"``: the back
  end gets ``/v1/small`` (both back ends serve ``/v1/`` as ``/``), with
  ``X-Forwarded-Prefix: /shop``;
* its header rules use templates on both sides: ``{client_ip}`` and ``{route}`` set on
  the request, a field removed, ``X-Process-Time = "{process_time}"`` set on the
  response and ``Server`` removed (as ``examples/rest-api.toml`` does).

So the single-route contender gets ``GET /small`` and this one ``GET /shop/small``, and
the back end does the same work for both. Every other path (``/ready``, the health
probe's ``/``) goes to the catch-all route, untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

#: Where the measured route serves the back end's paths.
MOUNT: Final = "/shop"
#: The group every route sends to.
GROUP: Final = "backend"
ROUTES: Final = 50

_SERVICES: Final = (
    "accounts", "billing", "catalog", "checkout", "comments", "documents", "events",
    "invoices", "messages", "notifications", "payments", "profiles", "reports", "reviews",
    "search", "sessions", "settings", "shipping", "uploads",
)  # fmt: skip


_SHOP_HEADERS: Final = (
    "[routes.shop.headers]",
    'request_set = { "X-Client" = "{client_ip}", "X-Gateway-Route" = "{route}" }',
    'request_remove = ["x-internal-token"]',
    'response_set = { "X-Process-Time" = "{process_time}" }',
    'response_remove = ["server"]',
)


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these)."""
    return json.dumps(text)


def config_text(upstream: str) -> str:
    """The TOML text: 50 routes, all to one group whose one server is ``upstream``.

    Args:
        upstream: ``HOST:PORT`` of the back end.
    """
    routes: list[tuple[str, dict[str, str]]] = []

    def route(name: str, **table: str) -> None:
        routes.append((name, table))

    # 15 host routes: 10 exact hosts (half of them with a path too), 5 wildcards.
    for i in range(10):
        match = f"{{ host = [{_q(f'svc{i}.example.org')}] }}"
        if i % 2:
            match = f'{{ host = [{_q(f"svc{i}.example.org")}], path_prefix = "/api" }}'
        route(f"host{i}", match=match)
    for i in range(5):
        route(f"team{i}", match=f"{{ host = [{_q(f'*.team{i}.example.org')}] }}")
    # 2 with a higher priority, 3 exact paths.
    route("admin", match='{ path_prefix = "/admin" }', priority="10")
    route(
        "health",
        match='{ path = "/healthz" }',
        priority="5",
        respond='{ status = 200, body = "ok" }',
    )
    for path in ("/login", "/logout", "/favicon.ico"):
        route(path.strip("/").replace(".", "-"), match=f"{{ path = {_q(path)} }}")
    # 21 prefixes longer than /shop, three of them under it.
    for service in _SERVICES:
        route(service, match=f"{{ path_prefix = {_q('/' + service)} }}")
    route("shop-cart", match=f"{{ path_prefix = {_q(MOUNT + '/cart')} }}")
    route("shop-orders", match=f"{{ path_prefix = {_q(MOUNT + '/orders')} }}")
    # The measured route, after two on the same prefix with more conditions.
    route(
        "shop-beta",
        match=f'{{ path_prefix = {_q(MOUNT)}, methods = ["GET"], headers = {{ "x-beta" = "1" }} }}',
    )
    route(
        "shop-write",
        match=f'{{ path_prefix = {_q(MOUNT)}, methods = ["POST", "PUT", "DELETE"] }}',
    )
    route(
        "shop",
        match=f'{{ path_prefix = {_q(MOUNT)}, methods = ["GET", "HEAD"] }}',
        rewrite=f'{{ strip_prefix = {_q(MOUNT)}, add_prefix = "/v1" }}',
    )
    # 5 regexes, then the catch-all.
    for i in range(5):
        route(f"items-v{i}", match=f"{{ path_regex = {_q(f'^/v{i}/items/[0-9]+$')} }}")
    route("default", match="{}")
    assert len(routes) == ROUTES, len(routes)

    lines = [
        f"# {ROUTES} routes, written by bench/gateway.py; the load hits routes.shop.",
        f"[upstreams.{GROUP}]",
        f"servers = [{_q('http://' + upstream)}]",
        "",
    ]
    for name, table in routes:
        lines.append(f"[routes.{name}]")
        if "respond" not in table:
            lines.append(f"upstream = {_q(GROUP)}")
        lines.extend(f"{key} = {value}" for key, value in table.items())
        if name == "shop":
            lines += _SHOP_HEADERS
        lines.append("")
    return "\n".join(lines)


def write_config(directory: Path, upstream: str) -> Path:
    """Write :func:`config_text` to ``directory/gateway.toml``; returns its path."""
    path = directory / "gateway.toml"
    path.write_text(config_text(upstream))
    return path
