"""The helpers' interface is fastapi-reverse-proxy 0.4.0's: same names, parameters
and defaults, so that a port changes only the import."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from trioproxy.asgi import LoadBalancer, proxy_pass, proxy_pass_websocket


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [
        (name, parameter.default)
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self"
    ]


EMPTY = inspect.Parameter.empty


def test_proxy_pass_signature() -> None:
    assert parameters(proxy_pass) == [
        ("request", EMPTY),
        ("upstream", EMPTY),
        ("path", None),
        ("timeout", 60.0),
        ("forward_query", True),
        ("additional_headers", None),
        ("override_headers", None),
        ("override_body", None),
        ("method", None),
        ("override_host", None),
    ]


def test_proxy_pass_websocket_signature() -> None:
    assert parameters(proxy_pass_websocket) == [
        ("websocket", EMPTY),
        ("upstream", EMPTY),
        ("path", None),
        ("subprotocols", None),
        ("forward_query", True),
        ("additional_headers", None),
        ("override_headers", None),
        ("timeout", 10.0),
    ]


def test_load_balancer_methods() -> None:
    assert parameters(LoadBalancer.proxy_pass) == [
        ("request", EMPTY),
        *[p for p in parameters(proxy_pass) if p[0] not in ("request", "upstream")],
    ]
    assert parameters(LoadBalancer.proxy_pass_websocket) == [
        ("websocket", EMPTY),
        *[p for p in parameters(proxy_pass_websocket) if p[0] not in ("websocket", "upstream")],
    ]
