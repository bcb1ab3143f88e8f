"""Choosing the parser behind the seam, as uvicorn's ``--http auto|h11|httptools``.

``auto`` takes httptools (llhttp, C) when it can be imported and h11 (pure
Python, the reference implementation) otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

from trioproxy.http.protocol import ClientProtocol, ServerProtocol

ParserChoice: TypeAlias = Literal["auto", "h11", "httptools"]
PARSER_CHOICES: tuple[ParserChoice, ...] = ("auto", "h11", "httptools")


def httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(choice: str) -> Literal["h11", "httptools"]:
    """The implementation a choice means on this machine.

    Raises:
        ValueError: an unknown choice, or ``httptools`` when it is not installed.
    """
    if choice == "auto":
        return "httptools" if httptools_available() else "h11"
    if choice == "httptools" and not httptools_available():
        raise ValueError("http: 'httptools' is not installed (pip install httptools)")
    if choice in ("h11", "httptools"):
        return choice  # type: ignore[return-value]
    raise ValueError(f"http: must be one of auto, h11, httptools; got {choice!r}")


def server_factory(choice: str) -> Callable[[int], ServerProtocol]:
    if resolve(choice) == "httptools":
        from trioproxy.http.httptools_impl import HttptoolsServer

        return HttptoolsServer
    from trioproxy.http.h11_impl import H11Server

    return H11Server


def client_factory(choice: str) -> Callable[[int], ClientProtocol]:
    if resolve(choice) == "httptools":
        from trioproxy.http.httptools_impl import HttptoolsClient

        return HttptoolsClient
    from trioproxy.http.h11_impl import H11Client

    return H11Client
